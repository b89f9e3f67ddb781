"""`mrm prepare` on small files written in the published layouts of PRISM and summarize_from_feedback."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrm_ray import cli
from mrm_ray.data import contract as C
from mrm_ray.data import storage


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


# --- the reference's preprocessing (--reference) -------------------------------------------
def _reference_prism_split(user: str, convs: list[str], seed: int = 42) -> set[str]:
    """train.py's split, transcribed: file order, shuffled by Random(seed + md5 % 2**32), floor(n/2) train."""
    import hashlib
    import random
    order = list(convs)
    random.Random(seed + int(hashlib.md5(user.encode("utf-8")).hexdigest(), 16) % 2**32).shuffle(order)
    return set(order[: len(order) // 2])


def test_prism_reference_split_and_pairs(tmp_path):
    records = [prism_conversation("user1", f"c1_{c}", n_turns=2) for c in range(7)]
    # a turn without a rejected reply: skipped, and NOT in the next turn's context (the reference)
    odd = prism_conversation("user1", "c1_odd", n_turns=3)
    odd["conversation_history"] = [u for u in odd["conversation_history"]
                                   if not (u["turn"] == 1 and u["role"] == "model" and not u["if_chosen"])]
    records.append(odd)
    records += [prism_conversation("user2", f"c2_{c}", n_turns=1) for c in range(6)]
    write_jsonl(tmp_path / "p" / "conversations.jsonl", records)
    write_jsonl(tmp_path / "p" / "survey.jsonl", [{"user_id": "user1", "num_completed_conversations": 8},
                                                  {"user_id": "user2", "num_completed_conversations": 6}])
    out = tmp_path / "o"
    assert cli.main(["prepare", "prism", "--source", str(tmp_path / "p"), "--out", str(out), "--reference"]) == 0
    rows = C.normalize_pairs(storage.read_table(str(out))).to_pylist()
    for user, convs in (("user1", [f"c1_{c}" for c in range(7)] + ["c1_odd"]), ("user2", [f"c2_{c}" for c in range(6)])):
        mine = [r for r in rows if r[C.USER_ID] == user]
        assert {r[C.CONV_ID] for r in mine if r[C.SPLIT] == C.TRAIN} == _reference_prism_split(user, convs)
        # pair ids number the reference's order: train conversations (shuffled order) first
        ordered = sorted(mine, key=lambda r: r[C.PAIR_ID])
        first_test = next(i for i, r in enumerate(ordered) if r[C.SPLIT] == C.TEST)
        assert all(r[C.SPLIT] == C.TEST for r in ordered[first_test:])
    third = [r for r in rows if r[C.CONV_ID] == "c1_odd" and r[C.CHOSEN] == "c1_odd reply 2.0"]
    assert len(third) == 1 and [m["content"] for m in third[0][C.PROMPT]] == [
        "c1_odd user says 0", "c1_odd reply 0.1", "c1_odd user says 2"]          # turn 1 left out
    # ours keeps the turn without a rejected reply in the later context (it was said, and answered)
    assert cli.main(["prepare", "prism", "--source", str(tmp_path / "p"), "--out", str(tmp_path / "ours")]) == 0
    ours = C.normalize_pairs(storage.read_table(str(tmp_path / "ours"))).to_pylist()
    third = [r for r in ours if r[C.CONV_ID] == "c1_odd" and r[C.CHOSEN] == "c1_odd reply 2.0"]
    assert [m["content"] for m in third[0][C.PROMPT]] == [
        "c1_odd user says 0", "c1_odd reply 0.1", "c1_odd user says 1", "c1_odd reply 1.0", "c1_odd user says 2"]


def test_prism_reference_needs_the_survey(tmp_path, capsys):
    write_jsonl(tmp_path / "p" / "conversations.jsonl", [prism_conversation("u", "c", 1)])
    assert cli.main(["prepare", "prism", "--source", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                     "--reference"]) == 2
    assert "survey.jsonl" in capsys.readouterr().err


def test_reddit_reference_keeps_order_cnn_rows_and_repeats(tmp_path):
    recs = reddit_records()
    (tmp_path / "hf" / "comparisons").mkdir(parents=True)
    for name, keep in (("train", lambda r: r["split"] == "train"), ("validation", lambda r: r["split"] != "train")):
        part = [{k: v for k, v in r.items() if k != "split"} for r in recs if keep(r)]
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "hf" / "comparisons" / f"{name}-00000-of-00001.parquet")
    out = tmp_path / "o"
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "hf"), "--out", str(out), "--reference"]) == 0
    rows = sorted(C.normalize_pairs(storage.read_table(str(out))).to_pylist(), key=lambda r: r[C.PAIR_ID])
    w1 = [r for r in rows if r[C.USER_ID] == "w1"]
    # train comparisons in file order (the CNN/DM row and the repeat kept), then validation
    assert [r[C.SPLIT] for r in w1] == [C.TRAIN] * 6 + [C.TEST] * 2
    assert [r[C.CHOSEN] for r in w1[:4]] == ["summary t3_w10 0 A", "summary t3_w11 1 B",
                                              "summary t3_w12 2 A", "summary t3_w13 3 B"]
    assert w1[4][C.PROMPT] == [{"role": "user", "content": ""}]                # the CNN/DM row: no post
    assert w1[0][C.PROMPT] == [{"role": "user", "content": "a post"}]         # the bare post
    assert all(r[C.CONV_ID] == r[C.PAIR_ID] for r in rows)                    # every pair its own conversation
    assert {r[C.USER_ID] for r in rows} == {"w1", "w2"}


# --- every input file read or refused ----------------------------------------------------------
def test_reddit_gzip_and_bom_files_are_read(tmp_path):
    import gzip
    recs = reddit_records()
    src = tmp_path / "src" / "comparisons"
    src.mkdir(parents=True)
    half = len(recs) // 2
    (src / "batch3.json").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs[:half]).encode())
    (src / "batch4.json.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs[half:]).encode()))
    (src / "README.md").write_text("notes")                                      # documentation: ignored, said so
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    check_reddit(storage.read_table(str(tmp_path / "o")))


@pytest.mark.parametrize("name, content, expect", [
    ("notes.csv", b"a,b", "is not a dataset file"),
    ("bad.json", b"\xff\xfe not utf-8", "is not UTF-8"),
])
def test_reddit_unreadable_files_are_refused(tmp_path, capsys, name, content, expect):
    write_jsonl(tmp_path / "src" / "batch1.json", reddit_records())
    (tmp_path / "src" / name).write_bytes(content)
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and name in err
    assert not (tmp_path / "o").exists()


def test_save_to_disk_folder_and_axis_files_are_named(tmp_path, capsys):
    d = tmp_path / "disk"
    d.mkdir()
    (d / "state.json").write_text("{}")
    (d / "dataset_info.json").write_text("{}")
    (d / "data-00000-of-00001.arrow").write_bytes(b"x")
    assert cli.main(["prepare", "reddit", "--source", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "save_to_disk" in capsys.readouterr().err
    axis = {"info": {"id": "p", "post": "x"}, "summary": {"text": "s"}, "split": "train", "worker": "w",
            "axes": {"overall": 5}}
    write_jsonl(tmp_path / "axis" / "batch1.json", [axis])
    assert cli.main(["prepare", "reddit", "--source", str(tmp_path / "axis"), "--out", str(tmp_path / "o")]) == 2
    assert "`axis` files" in capsys.readouterr().err
