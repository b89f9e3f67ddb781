"""The text population: contract-valid, deterministic, and its ground truth is learnable from the text."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from mrm_ray import cli
from mrm_ray import synth_text as S
from mrm_ray.data import contract as C
from mrm_ray.data import storage


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "pairs")
    summary = S.write_text_population(out, users=60, pairs_per_user=20, seed=3)
    return out, summary


def test_table_is_contract_valid_with_truth(population):
    out, summary = population
    assert storage.exists(f"{out}/_SUCCESS")
    pairs = C.normalize_pairs(storage.read_table(out))  # the truth folders are not part of the table
    assert pairs.num_rows == summary["pairs"] == 60 * 20
    rows = pairs.to_pylist()
    assert Counter(r[C.SPLIT] for r in rows) == {C.TRAIN: 600, C.TEST: 600}
    assert set(Counter(r[C.USER_ID] for r in rows).values()) == {20}
    users = storage.read_table(f"{out}/_truth").to_pylist()
    assert len(users) == 60 and {u["type"] for u in users} <= set(S.TYPES)
    assert len({u["type"] for u in users}) >= 3  # a few latent types, not one
    meta = storage.read_json(f"{out}/_truth.json")
    assert meta["attributes"] == list(S.ATTRIBUTES) and meta["seed"] == 3


def test_same_seed_same_population(tmp_path, population):
    out, _ = population
    S.write_text_population(str(tmp_path / "again"), users=60, pairs_per_user=20, seed=3)
    assert storage.read_table(str(tmp_path / "again")).equals(storage.read_table(out))
    assert storage.read_table(str(tmp_path / "again/_truth")).equals(storage.read_table(f"{out}/_truth"))
    S.write_text_population(str(tmp_path / "other"), users=60, pairs_per_user=20, seed=4)
    assert not storage.read_table(str(tmp_path / "other")).equals(storage.read_table(out))


def test_truth_is_consistent_with_labels(population):
    out, summary = population
    weights = {u[C.USER_ID]: np.array(u["weights"]) for u in storage.read_table(f"{out}/_truth").to_pylist()}
    truth = storage.read_table(f"{out}/_truth_pairs").to_pylist()
    agree = []
    for t in truth:
        margin = weights[t[C.USER_ID]] @ (np.array(t["chosen_attrs"]) - np.array(t["rejected_attrs"]))
        assert margin == pytest.approx(t["oracle_margin"], abs=1e-5)
        agree.append(margin > 0)
        assert t["label_agrees"] == (margin > 0)
    # Bradley-Terry labels with a clear margin: the true reward agrees with most labels, not all.
    assert 0.85 < np.mean(agree) < 0.99
    assert summary["oracle_test_accuracy"] > 0.85


def test_the_text_carries_the_attributes():
    rng = np.random.default_rng(0)
    short = S.render_response("sleep", [0, 0, 0, 0, 0], rng)
    rich = S.render_response("sleep", [1, 1, 1, 1, 1], rng)
    assert len(rich.split()) > 3 * len(short.split())
    assert rich.startswith("Thank you") and "\n5. " in rich and "For instance" in rich and "advisable" in rich
    assert "\n" not in short and "Thank" not in short


# --- the ground truth is recoverable -------------------------------------------------------
_MARKERS = [r"\bthank|\bplease\b|\bhope\b", r"advisable|recommend|furthermore|important|instance",
            r"\bjust\b|gotta|honestly|pretty|\blike,", r"for instance|\blike,", r"^\d+\. "]


def text_features(text: str) -> np.ndarray:
    """Simple surface counts: words, and politeness / formal / casual / example / list markers."""
    low = text.lower()
    return np.array([len(text.split()) / 20.0] + [len(re.findall(m, low, re.M)) for m in _MARKERS], float)


def fit_logistic(x: np.ndarray, steps: int = 800, lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """w maximizing mean log sigmoid(x @ w): every row is (chosen - rejected) features."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        w += lr * (x.T @ (1.0 - p) / len(x) - l2 * w)
    return w


def test_linear_probe_on_text_features_recovers_preferences(population):
    """One linear probe per latent type, fit on train pairs, close to the oracle on test pairs."""
    out, summary = population
    pairs = storage.read_table(out).to_pylist()
    kind = {u[C.USER_ID]: u["type"] for u in storage.read_table(f"{out}/_truth").to_pylist()}
    diff = np.stack([text_features(p[C.CHOSEN]) - text_features(p[C.REJECTED]) for p in pairs])
    types = np.array([kind[p[C.USER_ID]] for p in pairs])
    train = np.array([p[C.SPLIT] == C.TRAIN for p in pairs])
    correct = []
    for t in set(types):
        w = fit_logistic(diff[train & (types == t)])
        correct += list(diff[~train & (types == t)] @ w > 0)
    assert np.mean(correct) > 0.8
    assert np.mean(correct) > summary["oracle_test_accuracy"] - 0.1


def test_minilm_embeddings_encode_the_attributes(tmp_path):
    """The demo backbone separates the attributes linearly: heads fit on train pairs + true user weights."""
    from mrm_ray.backbone import default_cpu_model, encode_pairs, load_backbone

    out = str(tmp_path / "small")
    S.write_text_population(out, users=10, pairs_per_user=12, seed=1)
    pairs = storage.read_table(out).to_pylist()
    truth = {t[C.PAIR_ID]: t for t in storage.read_table(f"{out}/_truth_pairs").to_pylist()}
    weights = {u[C.USER_ID]: np.array(u["weights"]) for u in storage.read_table(f"{out}/_truth").to_pylist()}
    model, tok = load_backbone(default_cpu_model(), device="cpu")
    ch, rj = encode_pairs(model, tok, pairs)
    d = (ch - rj).numpy().astype(np.float64)
    attrs = np.array([np.subtract(truth[p[C.PAIR_ID]]["chosen_attrs"], truth[p[C.PAIR_ID]]["rejected_attrs"])
                      for p in pairs], float)
    train = np.array([p[C.SPLIT] == C.TRAIN for p in pairs])
    heads = np.linalg.solve(d[train].T @ d[train] + np.eye(d.shape[1]), d[train].T @ attrs[train])  # ridge
    w = np.stack([weights[p[C.USER_ID]] for p in pairs])
    accuracy = np.mean(np.sum(w[~train] * (d[~train] @ heads), axis=1) > 0)
    assert accuracy > 0.8


def test_cli_synth_kind_text(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli.main(["synth", "--kind", "text", "--out", out, "--users", "5", "--pairs-per-user", "4"]) == 0
    assert C.normalize_pairs(storage.read_table(out)).num_rows == 20


def _read_hard(prompt: str, text: str) -> list[int]:
    """HARD_ATTRIBUTES read back from a request and a response (an independent parser of the rendered text)."""
    asked_formal, asked_long = prompt.startswith("Could you"), ("thorough" in prompt or "detail" in prompt)
    opener_formal = text.startswith("Thank you for your question.")
    body_formal = "advisable" in text or "recommend that you" in text
    long = len(re.findall(r"advisable|recommend that you|important to|Just |gotta|Also,", text)) == 4
    polite = text.endswith(("further questions.", "good luck!"))
    return [int(polite), int(long == asked_long), int(body_formal == asked_formal), int(opener_formal == body_formal)]


def test_text_hard_attributes_are_relations_written_as_the_truth_says(tmp_path):
    """Known answer: each pair's attributes parse back from its request and texts exactly, and each relation
    attribute is independent of the one side a frozen embedding sees best (its body's register, its length)."""
    out = str(tmp_path / "hard")
    summary = S.write_text_population(out, users=40, pairs_per_user=16, seed=5, kind="text-hard")
    assert summary["kind"] == "text-hard" and storage.read_json(f"{out}/_truth.json")["attributes"] == list(
        S.HARD_ATTRIBUTES)
    pairs = {p[C.PAIR_ID]: p for p in storage.read_table(out).to_pylist()}
    truth = storage.read_table(f"{out}/_truth_pairs").to_pylist()
    body_formal, mirrors = [], []
    for t in truth:
        p = pairs[t[C.PAIR_ID]]
        request = p[C.PROMPT][0]["content"]
        assert _read_hard(request, p[C.CHOSEN]) == t["chosen_attrs"]
        assert _read_hard(request, p[C.REJECTED]) == t["rejected_attrs"]
        body_formal.append("advisable" in p[C.CHOSEN] or "recommend that you" in p[C.CHOSEN])
        mirrors.append(t["chosen_attrs"][2])
    body_formal, mirrors = np.array(body_formal), np.array(mirrors, bool)
    # a formal body is as common among responses that mirror the request's voice as among those that do not
    assert abs(body_formal[mirrors].mean() - body_formal[~mirrors].mean()) < 0.12


def _read_order(text: str) -> list[int]:
    """ORDER_ATTRIBUTES read back from a response (an independent parser of the rendered text)."""
    summary, first_point = text.index("In short,"), min(text.find(w) for w in ("It is advisable", "I would recommend"))
    first_example = text.index("For instance,")
    return [int(text.endswith("further questions.")), int(summary < first_point),
            int(first_example < first_point), int(text.startswith("You asked:"))]


def test_text_order_attributes_only_arrange_the_same_words(tmp_path):
    """Known answer: each response's attributes parse back as the truth says, and the same content with
    other order attributes has the same words (only `polite` adds any)."""
    out = str(tmp_path / "order")
    summary = S.write_text_population(out, users=30, pairs_per_user=8, seed=3, kind="text-order")
    assert summary["kind"] == "text-order" and storage.read_json(f"{out}/_truth.json")["attributes"] == list(
        S.ORDER_ATTRIBUTES)
    pairs = {p[C.PAIR_ID]: p for p in storage.read_table(out).to_pylist()}
    for t in storage.read_table(f"{out}/_truth_pairs").to_pylist():
        assert _read_order(pairs[t[C.PAIR_ID]][C.CHOSEN]) == t["chosen_attrs"]
        assert _read_order(pairs[t[C.PAIR_ID]][C.REJECTED]) == t["rejected_attrs"]
    for attrs in ([0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 1, 1]):
        a, b = (S.render_order_response("sleep", x, np.random.default_rng(9)) for x in ([0, 0, 0, 0], attrs))
        assert a != b and sorted(a.split()) == sorted(b.split())
