"""The Python API (one user in a few lines) and `mrm export-hf` (a user as a transformers checkpoint).

API: adapting users one at a time equals the batched path and a plain torch.optim
loop; a user's reward is v_u . e.  Export: the exported sequence classifier's logit
on a conversation equals the MRM reward of that conversation's embedding (the embed
stage's last-token hidden state) for that user, for a reward-model backbone and for
a bare base-model backbone.
"""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest
import torch
from reference_loops import adapt_one_user
from tiny_models import tiny_reward_model

from mrm_ray import api, cli, config
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage
from mrm_ray.errors import UserError

THETA0 = [0.4, -0.3, 0.1]


def make_run(uri: str, dim: int, overrides=(), seed: int = 0, scale: float = 0.2) -> str:
    cfg = config.load_config(overrides=["model.n_heads=3", "model.auto_input_scale=false",
                                        f"model.input_scale={scale}", f"seed={seed}", *overrides])
    head = runs.build_head(dim, cfg)
    with torch.no_grad():
        torch.manual_seed(seed)
        head.layers[0].normal_()
        head.theta0.copy_(torch.tensor(THETA0))
    runs.save_config(uri, cfg)
    runs.save_model(uri, head, cfg)
    return uri


def reference_adapt(run: runs.Run, ch: torch.Tensor, rj: torch.Tensor) -> torch.Tensor:
    """The reference's adapt_single_user (a fresh optimizer on theta), or the posterior mode (Newton)."""
    head = run.head
    prior = None if head.log_prior is None else head.log_prior.detach().exp()
    return adapt_one_user(head.theta0, head.weight(), ch, rj, run.cfg.inner, run.cfg.eval_steps,
                          head.cfg.weights, prior)


# --- API -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["inner.steps=8"],   # the default: linear weights, Newton steps
                                       ["model.weights=softmax", "inner.optimizer=sgd", "inner.lr=2.0", "inner.steps=3"]],
                         ids=["newton", "softmax-sgd"])
def test_api_one_user_equals_batched_path_and_reference(tmp_path, overrides):
    rm = api.load(make_run(str(tmp_path / "run"), 16, overrides))
    g = torch.Generator().manual_seed(0)
    counts = {"a": 1, "b": 7, "c": 0, "d": 3, "e": 12}
    pairs = {u: (torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)) for u, n in counts.items()}
    one_by_one = {u: rm.adapt(ch, rj) for u, (ch, rj) in pairs.items()}
    many = rm.adapt_many(pairs)
    # the batched core directly: all users' pairs flat, one call
    dphi = torch.cat([rm.personalizer.project(ch) - rm.personalizer.project(rj) for ch, rj in pairs.values()])
    seg = torch.repeat_interleave(torch.arange(len(pairs)), torch.tensor(list(counts.values())))
    theta, n = rm.personalizer.adapt(dphi, seg, len(pairs))
    emb = torch.randn(6, 16, generator=g)
    for i, (u, (ch, rj)) in enumerate(pairs.items()):
        user = one_by_one[u]
        torch.testing.assert_close(user.theta, theta[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(many[u].theta, theta[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(user.theta.double(), reference_adapt(rm.run, ch, rj), rtol=1e-5, atol=1e-6)
        assert user.n_support == counts[u] == int(n[i]) and user.prior == (counts[u] == 0)
        # reward = v_u . e with v_u = s W^T softmax(theta)
        v = rm.run.head.user_vector(user.theta).detach()
        torch.testing.assert_close(user.vector, v)
        torch.testing.assert_close(user.score(emb), emb @ v)
        torch.testing.assert_close(user.score(emb[0]), emb[0] @ v)
        r_ch, r_rj = user.score_pairs(emb[:3], emb[3:])
        torch.testing.assert_close(r_ch - r_rj, (emb[:3] - emb[3:]) @ v)
    assert one_by_one["c"].theta.tolist() == pytest.approx(THETA0) and rm.prior().prior
    assert one_by_one["b"].theta.tolist() != pytest.approx(THETA0)   # adaptation moved it
    assert rm.adapt_many([pairs["a"], pairs["d"]])[1].theta.tolist() == pytest.approx(many["d"].theta.tolist())


def test_api_bad_inputs(tmp_path):
    rm = api.load(make_run(str(tmp_path / "run"), 16))
    with pytest.raises(UserError, match="expects"):
        rm.adapt(torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(UserError, match="differ in shape"):
        rm.adapt(torch.zeros(2, 16), torch.zeros(3, 16))
    with pytest.raises(UserError, match="NaN"):
        rm.adapt(torch.full((1, 16), float("nan")), torch.zeros(1, 16))
    with pytest.raises(UserError, match="d=8"):
        rm.prior().score(torch.zeros(8))


def test_weights_from_another_run_are_refused(tmp_path):
    """A weights table written by `mrm score` carries its run's model fingerprint."""
    from mrm_ray.score import MODEL_SHA, weights_schema
    run_a = make_run(str(tmp_path / "a"), 16, seed=0)
    run_b = make_run(str(tmp_path / "b"), 16, seed=1)
    table = api.weights_table({"x": api.load(run_a).prior()})
    table = table.cast(weights_schema(3).with_metadata({MODEL_SHA: runs.load_run(run_a).model_sha256.encode()}))
    storage.write_table(table, str(tmp_path / "w"))
    assert api.load(run_a).user_from_weights(str(tmp_path / "w"), "x").prior
    with pytest.raises(UserError, match="different run"):
        api.load(run_b).user_from_weights(str(tmp_path / "w"), "x")


# --- export-hf -----------------------------------------------------------------------------
PAIRS = [
    {"prompt": [{"role": "user", "content": "Please summarize this post in one short sentence."}],
     "chosen": "Waking up early helped at first, but sleep quality mattered more.", "rejected": "It is a post."},
    {"prompt": "Thank you for asking! hello world", "chosen": "Here is a detailed answer with a list: first, second.",
     "rejected": "no"},
    {"prompt": [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps?"},
                {"role": "user", "content": "over the lazy dog, please explain"}],
     "chosen": "The author values customization and battery life.", "rejected": "The quick brown fox jumps."},
]
TEST_PAIRS = [
    {"prompt": "reward model preference pair", "chosen": "chosen answer with a list: first and third points.",
     "rejected": "rejected"},
    {"prompt": [{"role": "user", "content": "hello"}], "chosen": "I would be happy to help you with that.",
     "rejected": "The lazy dog."},
]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny reward model (LlamaForSequenceClassification) and the same weights as a bare LlamaModel."""
    from mrm_ray.backbone import load_backbone
    root = tmp_path_factory.mktemp("backbones")
    rm_dir = tiny_reward_model(root / "rm", hidden_size=48)
    model, tok = load_backbone(rm_dir, device="cpu", dtype="float32")
    model.model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {"reward-model": rm_dir, "base-model": str(root / "base")}


def conversations(pairs, key):
    return [([{"role": "user", "content": p["prompt"]}] if isinstance(p["prompt"], str) else p["prompt"])
            + [{"role": "assistant", "content": p[key]}] for p in pairs]


@torch.no_grad()
def exported_logits(folder: str, convs) -> torch.Tensor:
    """The exported checkpoint used the plain transformers way, one conversation at a time and as a padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    one = torch.stack([model(**tok.apply_chat_template(c, tokenize=True, return_dict=True, return_tensors="pt"))
                       .logits[0, 0] for c in convs])
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    batch = model(**tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)).logits[:, 0]
    torch.testing.assert_close(batch, one, atol=1e-4, rtol=1e-4)
    return one


@pytest.mark.parametrize("kind", ["reward-model", "base-model"])
def test_exported_logit_equals_mrm_reward(tmp_path, backbones, kind, capsys):
    backbone = backbones[kind]
    model, tok = api.load_backbone(backbone, device="cpu", dtype="float32")  # the export loads float32
    ch, rj = api.encode_pairs(model, tok, PAIRS)
    n = len(PAIRS)
    support = pa.table({C.USER_ID: ["alice"] * n + ["bob"] * n, C.PAIR_ID: [f"p{i}" for i in range(2 * n)],
                        C.CHOSEN_EMB: pa.FixedSizeListArray.from_arrays(pa.array(torch.cat([ch, rj]).numpy().reshape(-1)), 48),
                        C.REJECTED_EMB: pa.FixedSizeListArray.from_arrays(pa.array(torch.cat([rj, ch]).numpy().reshape(-1)), 48)})
    storage.write_table(support, str(tmp_path / "support"))
    run_uri = make_run(str(tmp_path / "run"), 48, ["inner.lr=3.0", "inner.steps=2"], scale=0.1)
    out = str(tmp_path / "alice")
    assert cli.main(["export-hf", "--run", run_uri, "--user", "alice", "--backbone", backbone, "--out", out,
                     "--support", str(tmp_path / "support")]) == 0
    assert "alice" in capsys.readouterr().out

    rm = api.load(run_uri)
    alice = rm.adapt(ch, rj)
    assert not alice.prior and alice.theta.tolist() != pytest.approx(THETA0, abs=1e-3)
    t_ch, t_rj = api.encode_pairs(model, tok, TEST_PAIRS)
    want = torch.cat([alice.score(t_ch), alice.score(t_rj), alice.score(ch)])
    got = exported_logits(out, conversations(TEST_PAIRS, "chosen") + conversations(TEST_PAIRS, "rejected")
                          + conversations(PAIRS, "chosen"))
    assert want.abs().max() > 0.1                                     # a meaningful comparison
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["mrm_user"] == "alice" and len(cfg["id2label"]) == 1 and cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["mrm"]["source"] == "support" and cfg["mrm"]["n_support"] == n
    assert cfg["mrm"]["theta"] == pytest.approx(alice.theta.tolist(), abs=1e-6)
    # bob's pairs are alice's the other way round: another user, other weights; re-export over a previous
    # export needs --overwrite
    bob_args = ["export-hf", "--run", run_uri, "--user", "bob", "--backbone", backbone, "--out", out,
                "--support", str(tmp_path / "support")]
    assert cli.main(bob_args) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main([*bob_args, "--overwrite"]) == 0
    bob = json.load(open(f"{out}/config.json"))
    assert bob["mrm_user"] == "bob" and bob["mrm"]["theta"] == pytest.approx(rm.adapt(rj, ch).theta.tolist(), abs=1e-6)
    assert bob["mrm"]["theta"] != pytest.approx(alice.theta.tolist(), abs=1e-3)


def test_export_from_weights_and_absent_user_gets_prior(tmp_path, backbones, caplog):
    run_uri = make_run(str(tmp_path / "run"), 48, scale=0.1)
    rm = api.load(run_uri)
    carol = rm.user(torch.tensor([2.0, -1.0, 0.5]), n_support=9)
    storage.write_table(api.weights_table({"carol": carol}), str(tmp_path / "weights"))
    out = str(tmp_path / "carol")
    assert cli.main(["export-hf", "--run", run_uri, "--user", "carol", "--backbone", backbones["reward-model"],
                     "--out", out, "--weights", str(tmp_path / "weights")]) == 0
    from transformers import AutoModelForSequenceClassification
    head = AutoModelForSequenceClassification.from_pretrained(out).score
    torch.testing.assert_close(head.weight[0], carol.vector)
    assert head.bias is None
    with caplog.at_level(logging.WARNING):
        dave = ["export-hf", "--run", run_uri, "--user", "dave", "--backbone", backbones["reward-model"],
                "--out", str(tmp_path / "dave"), "--weights", str(tmp_path / "weights")]
        assert cli.main(dave) == 2                      # a user nobody adapted: only with --prior
        assert cli.main([*dave, "--prior"]) == 0
    assert any("dave" in r.message and "prior" in r.message for r in caplog.records)
    cfg = json.load(open(tmp_path / "dave" / "config.json"))
    assert cfg["mrm"]["prior"] and cfg["mrm"]["source"] == "prior" and cfg["mrm"]["theta"] == pytest.approx(THETA0)


def test_export_errors_are_one_line(tmp_path, backbones, capsys):
    run16 = make_run(str(tmp_path / "run16"), 16)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [(["--run", run16, "--backbone", backbones["reward-model"], "--out", str(tmp_path / "o"), "--prior"],
              "hidden size 48"),
             (["--run", str(tmp_path / "nope"), "--backbone", backbones["reward-model"], "--out", str(tmp_path / "o")],
              "no run directory"),
             (["--run", make_run(str(tmp_path / "run48"), 48), "--backbone", backbones["reward-model"],
               "--out", str(tmp_path / "taken")], "not empty")]
    for args, message in cases:
        assert cli.main(["export-hf", "--user", "x", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_docstring_example_runs(tmp_path, backbones):
    """The module docstring's example, verbatim but for the run and model locations."""
    import textwrap
    doc = api.__doc__
    block = doc[doc.index("    from mrm_ray import api"):doc.index("Many users at once")]
    code = textwrap.dedent(block).replace('"runs/r1"', repr(make_run(str(tmp_path / "run"), 48)))
    code = code.replace('"Skywork/Skywork-Reward-V2-Llama-3.1-8B"', repr(backbones["reward-model"]))
    scope = {}
    exec(compile(code, "api-docstring", "exec"), scope)
    user, r_ch = scope["user"], scope["r_ch"]
    assert user.n_support == 1 and r_ch.shape == (1,)
    torch.testing.assert_close(r_ch, scope["test_ch"] @ user.vector)


def test_export_to_s3(tmp_path, backbones, s3_bucket):
    run_uri = make_run(f"{s3_bucket}/run", 48, scale=0.1)
    assert cli.main(["export-hf", "--run", run_uri, "--user", "erin", "--backbone", backbones["reward-model"],
                     "--out", f"{s3_bucket}/models/erin", "--prior"]) == 0   # no weights anywhere: the prior
    cfg = json.loads(storage.read_bytes(f"{s3_bucket}/models/erin/config.json"))
    assert cfg["mrm_user"] == "erin" and cfg["mrm"]["source"] == "prior"
    assert storage.exists(f"{s3_bucket}/models/erin/model.safetensors")
    assert storage.exists(f"{s3_bucket}/models/erin/tokenizer_config.json")
