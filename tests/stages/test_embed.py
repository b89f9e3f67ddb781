"""`mrm embed`: the Ray Data pipeline equals the reference's one-example-at-a-time loop.

The reference (MRM's preprocess scripts) runs the reward model on one
conversation at a time and keeps `hidden_states[-1][0, -1]` and the logit;
batching, length bucketing and padding (either side) must not change either.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from tiny_models import tiny_reward_model

from mrm_ray import backbone, cli
from mrm_ray.embed import embed
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage

ATOL = 1e-4


def make_pairs(n: int = 14) -> list[dict]:
    """Mixed lengths (1 to ~150 tokens), single- and multi-turn prompts, several users."""
    pairs = []
    for i in range(n):
        prompt = [{"role": "user", "content": "Please summarize this post: " + "the lazy dog " * (i % 5)}]
        if i % 3 == 0:
            prompt += [{"role": "assistant", "content": "Sure, here is a short answer."},
                       {"role": "user", "content": "more detail please " * (i % 4 + 1)}]
        pairs.append({C.USER_ID: f"u{i % 3}", C.PAIR_ID: f"p{i:02d}", C.CONV_ID: f"c{i // 2}",
                      C.SPLIT: C.TRAIN if i % 4 else C.TEST, C.PROMPT: prompt,
                      C.CHOSEN: "Here is a detailed answer with a list: first, second. " * (i % 6 + 1),
                      C.REJECTED: "ok" + " thank you" * (i % 3)})
    return pairs


def shared_pairs() -> list[dict]:
    """PRISM-like sharing: an opening turn with three replies besides the chosen one (three pairs, one
    prompt, one chosen reply), multi-turn prompts, and one pair's texts again for another user."""
    base, out = make_pairs(), []
    for i, p in enumerate(base):
        out.append(p)
        if i % 2 == 0:
            out += [dict(p, **{C.PAIR_ID: f"{p[C.PAIR_ID]}r{k}", C.REJECTED: f"another reply number {k} " * (k + 1)})
                    for k in range(2)]
    return out + [dict(base[3], **{C.PAIR_ID: "again", C.USER_ID: "u9"})]


def expected_tokens(ids, keys) -> int:
    """Tokens when every distinct token prefix within a group runs once (each distinct sequence once,
    a shared prompt or earlier turn once), computed independently of the encoder."""
    prefixes = {(k, tuple(q[:i])) for q, k in zip(ids, keys) for i in range(1, len(q) + 1)}
    return len(prefixes)


def pairs_table(pairs) -> pa.Table:
    return pa.Table.from_pylist(pairs, schema=pa.schema([
        (C.USER_ID, pa.string()), (C.PAIR_ID, pa.string()), (C.CONV_ID, pa.string()), (C.SPLIT, pa.string()),
        (C.PROMPT, C.PROMPT_TYPE), (C.CHOSEN, pa.string()), (C.REJECTED, pa.string())]))


@torch.no_grad()
def reference_loop(model_dir: str, pairs: list[dict]):
    """The reference's way: one conversation at a time, no padding, last position, the model's logit."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = {k: [] for k in ("chosen_emb", "rejected_emb", "chosen_score", "rejected_score")}
    for ex in pairs:
        for key in ("chosen", "rejected"):
            conv = ex[C.PROMPT] + [{"role": "assistant", "content": ex[key]}]
            if tok.chat_template:
                ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            else:   # no template: the contents joined by blank lines
                ids = tok("\n\n".join(m["content"] for m in conv), return_tensors="pt")["input_ids"]
            res = model(ids, output_hidden_states=True)
            out[f"{key}_emb"].append(res.hidden_states[-1][0, -1])
            out[f"{key}_score"].append(res.logits[0, 0])
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny random reward model twice, once with a left- and once with a right-padding tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {side: tiny_reward_model(root / side, padding_side=side) for side in ("left", "right")}


@pytest.fixture(scope="module")
def reference(models):
    return reference_loop(models["right"], make_pairs())


def check_against_reference(table: pa.Table, reference, pairs):
    table = C.normalize_embeddings(table)
    got = {r[C.PAIR_ID]: i for i, r in enumerate(table.select([C.PAIR_ID]).to_pylist())}
    order = [got[p[C.PAIR_ID]] for p in pairs]
    assert sorted(got) == sorted(p[C.PAIR_ID] for p in pairs)
    for col in (C.CHOSEN_EMB, C.REJECTED_EMB):
        mat = torch.from_numpy(C.emb_matrix(table.column(col)).copy())[order]
        torch.testing.assert_close(mat, reference[col].float(), atol=ATOL, rtol=1e-4)
    for col in (C.CHOSEN_SCORE, C.REJECTED_SCORE):
        scores = torch.tensor(table.column(col).to_pylist())[order]
        torch.testing.assert_close(scores, reference[col].float(), atol=ATOL, rtol=1e-4)
    keys = table.select([C.PAIR_ID, C.USER_ID, C.CONV_ID, C.SPLIT]).to_pylist()
    assert sorted(keys, key=lambda r: r[C.PAIR_ID]) == sorted(
        ({k: p[k] for k in (C.PAIR_ID, C.USER_ID, C.CONV_ID, C.SPLIT)} for p in pairs), key=lambda r: r[C.PAIR_ID])


# --- in-process API (no Ray) ------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_pairs_matches_reference_loop(models, reference, side):
    model, tok = backbone.load_backbone(models[side], device="cpu", dtype="float32")
    assert tok.padding_side == side
    # A small token budget forces several length-bucketed sub-batches, each padded.
    ch, rj, cs, rs = backbone.encode_pairs(model, tok, make_pairs(), batch_tokens=300, return_scores=True)
    torch.testing.assert_close(ch, reference["chosen_emb"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(rj, reference["rejected_emb"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(cs, reference["chosen_score"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(rs, reference["rejected_score"], atol=ATOL, rtol=1e-4)
    # The score head applied to the embedding reproduces the model's logit (the reference's own check).
    torch.testing.assert_close(model.score(ch).squeeze(-1), cs, atol=ATOL, rtol=1e-4)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The tiny reward model with a tokenizer that has no chat template."""
    return tiny_reward_model(tmp_path_factory.mktemp("plain") / "m", chat_template=False)


@pytest.mark.parametrize("side,template", [("left", True), ("right", True), ("right", False)])
def test_shared_prompts_and_repeated_texts_run_once(models, plain_model, side, template):
    """Each distinct text once, each prompt's shared prefix once (its key/value cache reused by every
    response): the same embeddings and scores as one text at a time, and exactly the tokens expected."""
    path = models[side] if template else plain_model
    pairs = shared_pairs()
    reference = reference_loop(path, pairs)
    model, tok = backbone.load_backbone(path, device="cpu", dtype="float32")
    enc = backbone.PairEncoder(model, tok, batch_tokens=300)   # several prefix and response batches
    assert enc.share_prefix
    ids, _ = enc.tokenize(backbone.pair_conversations([p[C.PROMPT] for p in pairs], [p[C.CHOSEN] for p in pairs],
                                                      [p[C.REJECTED] for p in pairs]))
    keys = [backbone.conversation_key(p[C.PROMPT]) for p in pairs] * 2
    emb, scores = enc.encode_distinct(ids, keys)
    n = len(pairs)
    for got, want in ((emb[:n], reference["chosen_emb"]), (emb[n:], reference["rejected_emb"]),
                      (scores[:n], reference["chosen_score"]), (scores[n:], reference["rejected_score"])):
        torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=1e-4)
    per_pair, computed, unshared, padded = enc.stats.take()
    assert per_pair == sum(map(len, ids)) and unshared == 0
    assert computed == expected_tokens(ids, keys) and computed < per_pair / 2
    assert computed <= padded <= 2 * computed


def test_radix_tree_known_answer_and_arena_offsets(models):
    """[1,2,3], [1,2,4], [1,2], [5]: one node [1,2] (where the third sequence ends) with children [3]
    and [4], and a lone root [5]; only nodes with children take arena slots, packed one after another."""
    seqs = [[1, 2, 3], [1, 2, 4], [1, 2], [5]]
    roots = sorted(backbone._radix_tree(seqs, [0, 1, 2, 3]), key=lambda n: n.start - n.end)
    shared, lone = roots
    assert (shared.start, shared.end, shared.ends) == (0, 2, 2) and (lone.start, lone.end, lone.ends) == (0, 1, 3)
    assert sorted((c.start, c.end, c.ends) for c in shared.children) == [(2, 3, 0), (2, 3, 1)]
    model, tok = backbone.load_backbone(models["right"], device="cpu", dtype="float32")
    enc = backbone.PairEncoder(model, tok, batch_tokens=2)
    enc.cache_ratio = 1                                        # a budget of 2 cached tokens a batch
    other = backbone._radix_tree([[7, 8, 9], [7, 8]], [0, 1])[0]
    batches = list(enc._tree_batches([shared, lone, other]))
    assert [tokens for _, tokens in batches] == [2, 2]        # [1,2] and [7,8] cached; the lone root is not
    assert batches[0][0] == [shared, lone] and (shared.off, other.off) == (0, 0)


def _plain_chunks(lengths, batch_tokens):
    """Length-sorted groups as a loop: at most batch_tokens // longest rows, none under half the longest."""
    order, groups = sorted(range(len(lengths)), key=lambda i: -lengths[i]), []
    for i in order:
        g = groups[-1] if groups else None
        if g and len(g) < max(1, batch_tokens // lengths[g[0]]) and 2 * lengths[i] >= lengths[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def test_chunks_cover_every_row_once_within_budget(models):
    """Token-bounded groups: every row once, longest first; a group of several rows keeps its rows'
    own lengths within half of its longest and its padded cost (segment + past at the cache's price)
    under batch_tokens, and takes the next row unless that breaks one of the two; rows of equal length
    come longest past first.  Without a past, the groups are a plain loop's."""
    model, tok = backbone.load_backbone(models["right"], device="cpu", dtype="float32")
    enc = backbone.PairEncoder(model, tok, batch_tokens=64)
    enc.cache_ratio = 4
    rng = np.random.default_rng(0)
    for past in (None, rng.integers(0, 200, 300)):
        lengths = rng.integers(1, 80, 300)
        groups = list(enc._chunks(lengths, past))
        assert sorted(np.concatenate(groups).tolist()) == list(range(300))
        p = np.zeros_like(lengths) if past is None else past
        order = np.concatenate(groups)
        assert (np.diff(lengths[order]) <= 0).all()
        assert (np.diff(p[order])[np.diff(lengths[order]) == 0] <= 0).all()
        for g, after in zip(groups, groups[1:] + [None]):
            if len(g) > 1:
                assert 2 * lengths[g].min() >= lengths[g].max()
                assert len(g) * (lengths[g].max() + p[g].max() // enc.cache_ratio) <= enc.batch_tokens
            if after is not None:                      # the next row did not fit
                more = np.append(g, after[0])
                assert (2 * lengths[after[0]] < lengths[g].max()
                        or len(more) * (lengths[more].max() + p[more].max() // enc.cache_ratio) > enc.batch_tokens)
        if past is None:
            assert [g.tolist() for g in groups] == _plain_chunks(lengths.tolist(), enc.batch_tokens)


def test_no_sharing_is_exactly_the_full_pass(models):
    """Encoders and mean pooling never share a prefix (every token sees the whole text); with every
    text distinct, the dedup path is the plain batched pass, bit for bit."""
    model, tok = backbone.load_backbone(models["right"], device="cpu", dtype="float32")
    enc = backbone.PairEncoder(model, tok, pooling="mean", batch_tokens=300)
    assert not enc.share_prefix
    pairs = make_pairs()
    ids, _ = enc.tokenize(backbone.pair_conversations([p[C.PROMPT] for p in pairs], [p[C.CHOSEN] for p in pairs],
                                                      [p[C.REJECTED] for p in pairs]))
    keys = [backbone.conversation_key(p[C.PROMPT]) for p in pairs] * 2
    assert torch.equal(enc.encode_distinct(ids, keys)[0], enc.encode_ids(ids)[0])
    minilm, mtok = backbone.load_backbone(backbone.default_cpu_model(), device="cpu", dtype="float32")
    assert not backbone.PairEncoder(minilm, mtok).share_prefix


def test_bfloat16_agrees_with_float32():
    """The CPU default where bf16 is native: the demo MiniLM's embeddings in bf16 point the same way."""
    pairs = make_pairs(8)
    got = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = backbone.load_backbone(backbone.default_cpu_model(), device="cpu", dtype=dtype)
        got[dtype] = torch.cat(backbone.encode_pairs(model, tok, pairs))
    cos = torch.nn.functional.cosine_similarity(got["float32"], got["bfloat16"], dim=1)
    assert cos.min() > 0.99, cos.min()


def test_truncation_keeps_the_end_and_is_counted(models):
    model, tok = backbone.load_backbone(models["right"], device="cpu")
    enc = backbone.PairEncoder(model, tok, max_length=12)
    convs = [[{"role": "user", "content": "hello " * 30}, {"role": "assistant", "content": "the end"}],
             [{"role": "user", "content": "hi"}]]
    full = tok.apply_chat_template(convs, tokenize=True, return_dict=True)["input_ids"]
    ids, truncated = enc.tokenize(convs)
    assert truncated == 1 and len(ids[0]) == 12 and ids[1] == full[1]
    assert ids[0][0] == tok.bos_token_id and ids[0][1:] == full[0][-11:]


def test_default_cpu_model_mean_pooling():
    """The demo MiniLM (no chat template): plain concatenation, mean over real tokens, 384-d."""
    path = backbone.default_cpu_model()
    model, tok = backbone.load_backbone(path, device="cpu", dtype="float32")
    pairs = make_pairs(3)
    ch, rj = backbone.encode_pairs(model, tok, pairs)
    assert ch.shape == (3, 384) and backbone.PairEncoder(model, tok).pooling == "mean"
    text = "\n\n".join([m["content"] for m in pairs[2][C.PROMPT]] + [pairs[2][C.REJECTED]])
    with torch.no_grad():
        hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(rj[2], hidden.mean(0), atol=ATOL, rtol=1e-4)


# --- the Ray Data pipeline ---------------------------------------------------------------------
def embed_cli(pairs_uri, out_uri, model, *extra):
    return cli.main(["embed", "--pairs", pairs_uri, "--out", out_uri, "--model", model,
                     "--batch-rows", "4", "--batch-tokens", "300", "--dtype", "float32", *extra])


def test_pipeline_matches_reference_left_padding_and_reruns_identically(ray_local, tmp_path, models, reference):
    pairs = make_pairs()
    storage.write_table(pairs_table(pairs), str(tmp_path / "pairs"))
    truth = pa.table({C.USER_ID: ["u0"], "oracle_test_accuracy": [0.9]})  # as a synthetic population has
    storage.write_table(truth, str(tmp_path / "pairs" / "_truth"))
    out = str(tmp_path / "emb")
    assert embed_cli(str(tmp_path / "pairs"), out, models["left"]) == 0
    assert storage.exists(f"{out}/_SUCCESS")
    assert storage.read_table(f"{out}/_truth").equals(truth)  # ground truth travels with the embeddings
    first = storage.read_table(out)
    assert first.schema.field(C.CHOSEN_EMB).type == C.emb_type(48)
    made = runs.provenance(out)   # how the table was made travels in its schema
    assert made["backbone"] == models["left"] and made["pooling"] == "last" and made["dim"] == "48"
    assert made["dtype"] == "float32" and int(made["max_length"]) >= 2 and made["backbone_id"]
    check_against_reference(first, reference, pairs)
    # A rerun over the same output (with --overwrite) replaces it with the same table: same rows, same order, same
    # numbers (bit-for-bit in practice; the BLAS may round the last bit differently between
    # processes when memory alignment differs, so the values are compared at 1e-6).
    assert embed_cli(str(tmp_path / "pairs"), out, models["left"], "--overwrite") == 0
    again = storage.read_table(out)
    assert again.schema == first.schema
    assert again.drop_columns([C.CHOSEN_EMB, C.REJECTED_EMB, C.CHOSEN_SCORE, C.REJECTED_SCORE]).equals(
        first.drop_columns([C.CHOSEN_EMB, C.REJECTED_EMB, C.CHOSEN_SCORE, C.REJECTED_SCORE]))
    for col in (C.CHOSEN_EMB, C.REJECTED_EMB):
        np.testing.assert_allclose(C.emb_matrix(again.column(col)), C.emb_matrix(first.column(col)), atol=1e-6)


def test_pipeline_runs_each_text_and_prompt_once(ray_local, tmp_path, models):
    """Whole-table dedup through Ray Data (pairs of one prompt hash-partitioned together): the reference's
    numbers, the tokens of the in-process encoder, and --no-dedup gives the same table in input order."""
    pairs = shared_pairs()
    storage.write_table(pairs_table(pairs), str(tmp_path / "pairs"))
    reference = reference_loop(models["left"], pairs)
    kw = dict(model=models["left"], dtype="float32", batch_rows=4, batch_tokens=300)
    summary = embed(str(tmp_path / "pairs"), str(tmp_path / "emb"), **kw)
    check_against_reference(storage.read_table(str(tmp_path / "emb")), reference, pairs)
    enc = backbone.PairEncoder(*backbone.load_backbone(models["left"], device="cpu", dtype="float32"))
    ids, _ = enc.tokenize(backbone.pair_conversations([p[C.PROMPT] for p in pairs], [p[C.CHOSEN] for p in pairs],
                                                      [p[C.REJECTED] for p in pairs]))
    keys = [backbone.conversation_key(p[C.PROMPT]) for p in pairs] * 2
    assert summary["per_pair_tokens"] == sum(map(len, ids))
    assert summary["tokens"] == expected_tokens(ids, keys) < summary["per_pair_tokens"] / 2
    assert summary["distinct_texts"] == len({(k, tuple(q)) for k, q in zip(keys, ids)}) < 2 * len(pairs)
    plain = embed(str(tmp_path / "pairs"), str(tmp_path / "plain"), dedup=False, **kw)
    table = storage.read_table(str(tmp_path / "plain"))
    assert table.column(C.PAIR_ID).to_pylist() == [p[C.PAIR_ID] for p in pairs]   # input order
    check_against_reference(table, reference, pairs)
    assert plain["tokens"] == plain["per_pair_tokens"] == summary["per_pair_tokens"]   # the plain pass
    for s in (summary, plain):   # time inside the backbone: reported, and part of the stage's wall time
        assert 0 < s["backbone_seconds"] <= s["seconds"]
        assert s["tokens"] <= s["padded_tokens"] <= 2 * s["tokens"]   # no row pads more than its own length


def test_pipeline_all_distinct_mean_pooling_is_todays_output(ray_local, tmp_path, models):
    """No text repeats and mean pooling shares no prefix: dedup and --no-dedup write the same rows."""
    storage.write_table(pairs_table(make_pairs()), str(tmp_path / "pairs"))
    kw = dict(model=models["right"], dtype="float32", batch_rows=4, batch_tokens=300, pooling="mean")
    embed(str(tmp_path / "pairs"), str(tmp_path / "a"), **kw)
    embed(str(tmp_path / "pairs"), str(tmp_path / "b"), dedup=False, **kw)
    a, b = (storage.read_table(str(tmp_path / x)).sort_by(C.PAIR_ID) for x in "ab")
    assert a.drop_columns([C.CHOSEN_EMB, C.REJECTED_EMB]).equals(b.drop_columns([C.CHOSEN_EMB, C.REJECTED_EMB]))
    for col in (C.CHOSEN_EMB, C.REJECTED_EMB):
        np.testing.assert_allclose(C.emb_matrix(a.column(col)), C.emb_matrix(b.column(col)), atol=1e-6)


def test_pipeline_s3_round_trip_right_padding(ray_local, s3_bucket, models, reference):
    pairs = make_pairs()
    storage.write_table(pairs_table(pairs), f"{s3_bucket}/pairs")
    assert embed_cli(f"{s3_bucket}/pairs", f"{s3_bucket}/emb", models["right"], "--emb-dtype", "float16") == 0
    table = storage.read_table(f"{s3_bucket}/emb")
    assert table.schema.field(C.CHOSEN_EMB).type == C.emb_type(48, pa.float16())
    assert storage.exists(f"{s3_bucket}/emb/_SUCCESS")
    got = torch.from_numpy(C.emb_matrix(table.column(C.CHOSEN_EMB)).copy())
    ids = [r[C.PAIR_ID] for r in table.select([C.PAIR_ID]).to_pylist()]
    want = reference["chosen_emb"][[int(i[1:]) for i in ids]]
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=1e-3)  # float16 storage


def test_bad_rows_fail_with_one_line_and_no_complete_output(ray_local, tmp_path, models, capsys):
    pairs = make_pairs()
    pairs[5][C.REJECTED] = "   "
    pairs[9][C.REJECTED] = ""
    storage.write_table(pairs_table(pairs), str(tmp_path / "pairs"))
    out = tmp_path / "emb"
    assert embed_cli(str(tmp_path / "pairs"), str(out), models["right"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "rejected" in err[0] and "empty" in err[0] and "pair_id='p" in err[0]
    assert not (out / "_SUCCESS").exists() and not list(out.glob(".partial-*")) and not list(out.glob("*.parquet"))


def test_missing_column_fails_before_any_work(tmp_path, models, capsys):
    storage.write_table(pairs_table(make_pairs()).drop_columns([C.CHOSEN]), str(tmp_path / "pairs"))
    assert embed_cli(str(tmp_path / "pairs"), str(tmp_path / "emb"), models["right"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing column(s) chosen" in err
    assert not (tmp_path / "emb" / "_SUCCESS").exists()


def test_nonexistent_model_path(tmp_path, capsys):
    storage.write_table(pairs_table(make_pairs(2)), str(tmp_path / "pairs"))
    missing = str(tmp_path / "no" / "such-model")
    assert embed_cli(str(tmp_path / "pairs"), str(tmp_path / "emb"), missing) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err and "does not exist" in err


def test_unreachable_bucket(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MRM_S3_CONNECT_TIMEOUT", "1")
    assert embed_cli("s3://nowhere/pairs", str(tmp_path / "emb"), "unused") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://nowhere/pairs" in err
