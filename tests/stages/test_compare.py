"""`mrm compare` end to end (active onboarding itself: tests/core/test_active.py)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from mrm_ray.cli import main


# --- mrm compare end to end -------------------------------------------------------------------
def test_compare_end_to_end(tmp_path, capsys):
    emb, out = str(tmp_path / "emb"), str(tmp_path / "cmp")
    assert main(["synth", "--out", emb, "--users", "400", "--dim", "16", "--seed", "3"]) == 0
    assert main(["compare", "--embeddings", emb, "--out", out, "--epochs", "3", "--questions", "4",
                 "--reference-epochs", "3"]) == 0
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    methods = {"shared_bt", "lore", "pref", "mrm_ref", "mrm", "mrm_rpo", "oracle"}
    assert set(report["methods"]) == methods
    for m in report["methods"].values():
        assert 0.0 <= m["unseen"]["accuracy"] <= 1.0 and m["unseen"]["users"] > 100
        assert set(m["few_shot"]) == {"1", "2", "4", "8", "16"}
    # the personalized baselines beat one shared reward on unseen users; nobody beats the truth
    acc = {k: m["unseen"]["accuracy"] for k, m in report["methods"].items()}
    assert min(acc["lore"], acc["pref"]) > acc["shared_bt"]
    assert max(v for k, v in acc.items() if k != "oracle") < acc["oracle"]
    assert set(report["active"]["curves"]) == {"uncertainty", "margin", "random"}
    assert all(len(c) == 5 for c in report["active"]["curves"].values())
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    for label in ("shared BT", "LoRe", "PReF", "MRM (no RPO)", "MRM + RPO", "oracle", "uncertainty", "@16"):
        assert label in table
    for png in ("few_shot.png", "active.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_user = pq.read_table(tmp_path / "cmp" / "per_user.parquet")
    assert per_user.num_rows == 400 and "mrm_rpo_acc_1_shot" in per_user.column_names
    # the two MRM variants differ only in RPO, and their runs are reusable
    cfgs = [json.loads((tmp_path / "cmp" / "runs" / k / "config.json").read_text()) for k in ("mrm", "mrm_rpo")]
    assert cfgs[0]["rpo"]["enabled"] is False and cfgs[1]["rpo"]["enabled"] is True
    assert cfgs[0]["epochs"] == cfgs[1]["epochs"] == 3
    assert "| MRM + RPO |" in capsys.readouterr().out
    # redone on a regenerated table: --overwrite trains its runs afresh (they cannot resume on another table)
    assert main(["synth", "--out", emb, "--users", "400", "--dim", "16", "--seed", "4", "--overwrite"]) == 0
    assert main(["compare", "--embeddings", emb, "--out", out, "--epochs", "2", "--questions", "0",
                 "--methods", "shared_bt", "--overwrite"]) == 0
    assert json.loads((tmp_path / "cmp" / "runs" / "mrm_rpo" / "config.json").read_text())["epochs"] == 2
    assert not (tmp_path / "cmp" / "runs" / "mrm").exists()


def test_compare_user_errors(tmp_path, capsys):
    assert main(["compare", "--embeddings", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["compare", "--embeddings", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "rpo.enabled=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mrm compare: error:") for line in err)
    assert "rpo.enabled" in err[1]
