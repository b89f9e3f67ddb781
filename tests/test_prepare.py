"""`mrm prepare` on small files written in the published layouts of PRISM and summarize_from_feedback."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrm_ray import cli, storage
from mrm_ray import contract as C


# --- PRISM layout ------------------------------------------------------------------
def prism_conversation(user: str, conv: str, n_turns: int, rejected_first: int = 3) -> dict:
    """A conversation record as in prism-alignment's conversations.jsonl.

    Turn 0: the user's opening prompt, 1 chosen + `rejected_first` other model replies;
    later turns: the chosen model answers twice (A/B), one chosen.
    """
    history = []
    for t in range(n_turns):
        history.append({"turn": t, "role": "user", "content": f"{conv} user says {t}", "model_provider": None,
                        "model_name": None, "score": None, "if_chosen": None, "within_turn_id": None})
        n_replies = 1 + (rejected_first if t == 0 else 1)
        for k in range(n_replies):
            chosen = k == (1 if t == 0 else 0)  # the chosen reply is not always the first one listed
            history.append({"turn": t, "role": "model", "content": f"{conv} reply {t}.{k}",
                            "model_provider": "prov", "model_name": f"model-{k}",
                            "score": 90 if chosen else 40 + k, "if_chosen": chosen, "within_turn_id": k})
    return {"conversation_id": conv, "user_id": user, "generated_datetime": "2023-11-22 15:00:00",
            "conversation_type": "unguided", "opening_prompt": f"{conv} user says 0",
            "conversation_turns": n_turns, "conversation_history": history, "open_feedback": "fine"}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def prism_dir(tmp_path):
    records = []
    for c in range(7):  # heavy user: 7 conversations of 2 turns -> (3 + 1) pairs each
        records.append(prism_conversation("user1", f"c1_{c}", n_turns=2))
    for c in range(6):  # exactly at the threshold, 1 turn each -> 3 pairs
        records.append(prism_conversation("user2", f"c2_{c}", n_turns=1))
    for c in range(5):  # below the threshold: dropped
        records.append(prism_conversation("user3", f"c3_{c}", n_turns=3))
    for c in range(6):  # not in the survey: dropped
        records.append(prism_conversation("ghost", f"c4_{c}", n_turns=1))
    write_jsonl(tmp_path / "prism" / "conversations.jsonl", records)
    write_jsonl(tmp_path / "prism" / "survey.jsonl",
                [{"user_id": u, "num_completed_conversations": 6} for u in ("user1", "user2", "user3")])
    return tmp_path / "prism"


def test_prism_pairs_counts_contexts_and_split(prism_dir, tmp_path):
    out = tmp_path / "pairs"
    assert cli.main(["prepare", "prism", "--source", str(prism_dir), "--out", str(out)]) == 0
    assert storage.exists(str(out / "_SUCCESS"))
    table = C.normalize_pairs(storage.read_table(str(out)))
    rows = table.to_pylist()
    per_user = Counter(r[C.USER_ID] for r in rows)
    assert per_user == {"user1": 7 * 4, "user2": 6 * 3}  # user3 (<6 conversations) and ghost (no survey) dropped
    assert len({r[C.PAIR_ID] for r in rows}) == len(rows)

    by_id = {r[C.PAIR_ID]: r for r in rows}
    first = [by_id[f"c1_0-t0-r{k}"] for k in (0, 2, 3)]  # one pair per rejected reply of turn 0
    assert all(p[C.CHOSEN] == "c1_0 reply 0.1" for p in first)
    assert [p[C.REJECTED] for p in first] == ["c1_0 reply 0.0", "c1_0 reply 0.2", "c1_0 reply 0.3"]
    assert first[0][C.PROMPT] == [{"role": "user", "content": "c1_0 user says 0"}]
    second = by_id["c1_0-t1-r1"]  # context = earlier user turn + the CHOSEN reply, then this turn's message
    assert second[C.PROMPT] == [{"role": "user", "content": "c1_0 user says 0"},
                                {"role": "assistant", "content": "c1_0 reply 0.1"},
                                {"role": "user", "content": "c1_0 user says 1"}]
    assert (second[C.CHOSEN], second[C.REJECTED]) == ("c1_0 reply 1.0", "c1_0 reply 1.1")

    # 50/50 by conversation per user; a conversation never straddles train and test.
    conv_split = defaultdict(set)
    for r in rows:
        assert r[C.CONV_ID] == r[C.PAIR_ID].split("-t")[0]
        conv_split[(r[C.USER_ID], r[C.CONV_ID])].add(r[C.SPLIT])
    assert all(len(s) == 1 for s in conv_split.values())
    splits = Counter((u, s.pop()) for (u, _), s in conv_split.items())
    assert splits == {("user1", "train"): 4, ("user1", "test"): 3, ("user2", "train"): 3, ("user2", "test"): 3}

    # Deterministic: a second run gives the same table.
    again = tmp_path / "pairs2"
    assert cli.main(["prepare", "prism", "--source", str(prism_dir), "--out", str(again)]) == 0
    assert storage.read_table(str(again)).equals(storage.read_table(str(out)))


def test_prism_missing_field_is_one_line(tmp_path, capsys):
    rec = prism_conversation("user1", "c0", n_turns=1)
    del rec["conversation_history"][1]["if_chosen"]
    write_jsonl(tmp_path / "p" / "conversations.jsonl", [rec])
    assert cli.main(["prepare", "prism", "--source", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "conversations.jsonl line 1" in err and "if_chosen" in err
    assert not (tmp_path / "o" / "_SUCCESS").exists()


def test_prism_missing_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["prepare", "prism", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "conversations.jsonl" in capsys.readouterr().err


# --- Reddit TL;DR layout ------------------------------------------------------------------
def comparison(worker: str, post_id: str, split: str, choice: int, k: int, post: str | None = "a post") -> dict:
    """A record as in summarize_from_feedback's comparisons/batch*.json (one JSON object a line)."""
    info = {"id": post_id, "post": post, "title": f"title {post_id}", "subreddit": "tifu"}
    if post is None:  # CNN/DM rows carry an article instead of a post
        info = {"id": post_id, "article": "news", "site": "cnn"}
    return {"info": info, "split": split, "worker": worker, "choice": choice, "batch": "batch3",
            "summaries": [{"text": f"summary {post_id} {k} A", "policy": "sup", "note": None},
                          {"text": f"summary {post_id} {k} B", "policy": "ppo", "note": None}],
            "extra": {"confidence": 7}}


def reddit_records():
    recs = []
    for w, n_train, n_valid in (("w1", 4, 2), ("w2", 3, 1), ("w3", 5, 0), ("w4", 0, 3)):
        recs += [comparison(w, f"t3_{w}{i}", "train", i % 2, i) for i in range(n_train)]
        recs += [comparison(w, f"t3_{w}v{i}", "valid1" if i % 2 else "valid2", 1, i) for i in range(n_valid)]
    recs.append(comparison("w1", "cnn1", "train", 0, 0, post=None))  # skipped: not Reddit
    recs.append(comparison("w1", "t3_w10", "train", 0, 0))  # an exact repeat of a w1 comparison
    return recs


def check_reddit(table):
    rows = C.normalize_pairs(table).to_pylist()
    assert Counter((r[C.USER_ID], r[C.SPLIT]) for r in rows) == {
        ("w1", "train"): 4, ("w1", "test"): 2, ("w2", "train"): 3, ("w2", "test"): 1}  # w3, w4: one split only
    r = next(r for r in rows if r[C.CONV_ID] == "t3_w11")
    assert r[C.CHOSEN] == "summary t3_w11 1 B" and r[C.REJECTED] == "summary t3_w11 1 A"  # choice=1
    assert r[C.PROMPT] == [{"role": "user", "content": "SUBREDDIT: r/tifu\nTITLE: title t3_w11\nPOST: a post"}]


def test_reddit_openai_batch_files(tmp_path):
    recs = reddit_records()
    write_jsonl(tmp_path / "src" / "comparisons" / "batch3.json", recs[: len(recs) // 2])
    write_jsonl(tmp_path / "src" / "comparisons" / "batch4.json", recs[len(recs) // 2:])
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    check_reddit(storage.read_table(str(tmp_path / "o")))


def test_reddit_hf_parquet_export(tmp_path):
    """The Hugging Face export: same columns, split given by the file (train-*/validation-*)."""
    recs = reddit_records()
    (tmp_path / "hf" / "comparisons").mkdir(parents=True)
    for name, keep in (("train", lambda r: r["split"] == "train"), ("validation", lambda r: r["split"] != "train")):
        part = [{k: v for k, v in r.items() if k != "split"} for r in recs if keep(r)]
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "hf" / "comparisons" / f"{name}-00000-of-00001.parquet")
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 0
    check_reddit(storage.read_table(str(tmp_path / "o")))


def test_reddit_missing_field(tmp_path, capsys):
    rec = comparison("w1", "p1", "train", 0, 0)
    del rec["worker"]
    write_jsonl(tmp_path / "src" / "batch1.json", [rec])
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch1.json record 1" in err and "'worker'" in err


def test_prepare_reads_s3(tmp_path, s3_bucket):
    recs = reddit_records()
    src = tmp_path / "src"
    write_jsonl(src / "batch.jsonl", recs)
    storage.write_bytes(f"{s3_bucket}/raw/batch.jsonl", (src / "batch.jsonl").read_bytes())
    assert cli.main(["prepare", "reddit", "--source", f"{s3_bucket}/raw", "--out", f"{s3_bucket}/pairs"]) == 0
    check_reddit(storage.read_table(f"{s3_bucket}/pairs"))
