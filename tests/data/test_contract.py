"""The table contract (mrm_ray.data.contract): defaults, and one-line refusals of bad tables."""

import pyarrow as pa
import pytest

from mrm_ray.data import contract as C


# --- contract ------------------------------------------------------------------------------
def pairs(**over):
    base = {C.USER_ID: ["a", "b"], C.PAIR_ID: ["1", "2"], C.PROMPT: ["hi", "yo"],
            C.CHOSEN: ["good", "fine"], C.REJECTED: ["bad", "meh"]}
    base.update(over)
    return pa.table({k: v for k, v in base.items() if v is not None})


def test_pairs_defaults_and_string_prompt():
    t = C.normalize_pairs(pairs())
    assert t.column(C.CONV_ID).to_pylist() == ["1", "2"] and t.column(C.SPLIT).to_pylist() == ["train"] * 2
    assert t.column(C.PROMPT).to_pylist()[0] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("table, needle", [
    (pairs(chosen=None), "missing column(s) chosen"),
    (pairs(rejected=["bad", " "]), "'rejected' has empty values: 1 row(s) empty or null (first: row 1, user_id='b'"),
    (pairs(split=["train", "dev"]), "found 'dev'"),
    (pairs(pair_id=["1", "1"]), "'pair_id' must be unique; '1'"),
    (pairs(prompt=[1, 2]), "'prompt' must be a string or a list"),
])
def test_pairs_refused_with_one_line(table, needle):
    with pytest.raises(C.ContractError) as e:
        C.normalize_pairs(table)
    assert needle in str(e.value) and "\n" not in str(e.value)


def emb_table(chosen, rejected):
    return pa.table({C.USER_ID: ["a"] * len(chosen), C.PAIR_ID: [str(i) for i in range(len(chosen))],
                     C.CHOSEN_EMB: chosen, C.REJECTED_EMB: rejected})


def test_embeddings_refused():
    with pytest.raises(C.ContractError, match="non-finite"):
        C.normalize_embeddings(emb_table([[1.0, float("nan")]], [[1.0, 2.0]]))
    with pytest.raises(C.ContractError, match="mixes embedding dimensions"):
        C.normalize_embeddings(emb_table([[1.0, 2.0], [1.0]], [[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(C.ContractError, match="different dimensions"):
        C.normalize_embeddings(emb_table([[1.0, 2.0]], [[1.0, 2.0, 3.0]]))
    with pytest.raises(C.ContractError, match="does not match the expected 3"):
        C.normalize_embeddings(emb_table([[1.0, 2.0]], [[1.0, 2.0]]), dim=3)
    t = C.normalize_embeddings(emb_table([[1.0, 2.0]], [[3.0, 4.0]]))  # plain lists accepted
    assert t.schema.field(C.CHOSEN_EMB).type == pa.list_(pa.float32(), 2)
