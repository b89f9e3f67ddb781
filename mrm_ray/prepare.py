"""Convert the published PRISM or Reddit TL;DR preference files into the pairs table.

  mrm prepare prism  --source DIR_OR_URI --out URI [--reference]   # HannahRoseKirk/prism-alignment
  mrm prepare reddit --source DIR_OR_URI --out URI [--reference]   # openai/summarize_from_feedback "comparisons"

PRISM (`conversations.jsonl`, optional `survey.jsonl`): a user is a `user_id`.
In every turn the participant rated several model replies and the chosen one
continued the conversation, so each turn gives one pair per rejected reply
(chosen vs that reply); the prompt is the earlier user turns and chosen
replies plus this turn's user message.  Users with fewer than 6 conversations
that yield pairs are dropped (as in LoRe and MRM), and each user's
conversations are split 50/50 into train/test (the odd one to train) by a
seeded per-user shuffle.  Our own rules where turns are irregular: a turn
without a user message or without a non-empty chosen reply ends the
conversation (later turns would continue a dialogue we cannot reconstruct); a
turn with a chosen reply but no rejected one gives no pair but stays in the
later context (it was said and answered); a turn with several chosen replies
uses the first (the others are neither chosen nor rejected); empty rejected
replies are skipped.

Reddit TL;DR (OpenAI's JSON-lines batch files `comparisons/batch*.json[.gz]`,
or the Hugging Face export of the same columns as Parquet/JSONL): a user is a
`worker`; pair = `summaries[choice]` vs the other summary; the prompt is the
post (with its subreddit and title, or the bare post with --post-only);
`train` comparisons become train pairs, `valid1`/`valid2`/`validation` ones
test pairs; workers present in only one split are dropped; a comparison
repeated across batch files counts once.  Rows without a Reddit post (the
CNN/DM article comparisons of the validation split) are skipped, as are
comparisons of two equal summaries.

--reference reproduces the reference code's preprocessing and splits instead
(what the `prism` and `reddit` presets of `mrm train` expect):
  PRISM: users who took the survey (num_completed_conversations > 0); a turn
    missing its user message, chosen or rejected reply is skipped without
    ending the conversation (nor entering the later context); users keep
    conversations with at least one such turn, and need 6; the train/test split
    shuffles a user's conversations (file order) with
    random.Random(seed + md5(user_id) % 2**32) and puts the first floor(n/2) in
    train (seed: train.py's --seed, 42).
  Reddit: the bare post as the prompt; no de-duplication; the CNN/DM rows are
    kept (the reference passes their missing post on; here: an empty message).
  pair_id is `<user>/<position>` in the reference's own order (train items
  first), which the `reddit`/`prism` presets read back; with Reddit, give the
  Hugging Face export (train files sort before validation files) for the
  reference's row order.

Every file under --source is read or refused with one line: JSON lines (.json,
.jsonl, optionally .gz) and Parquet; a `datasets.save_to_disk` folder, the
`axis` files and anything else are refused by name.  README/LICENSE files and
dotfiles are ignored (and said so).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mrm_ray.data import contract as C
from mrm_ray.data import storage
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)

PRISM_CONVERSATIONS, PRISM_SURVEY = "conversations.jsonl", "survey.jsonl"
MIN_CONVERSATIONS = 6
SPLIT_SEED = 123      # seed of our per-user PRISM split (any fixed value: a user's split depends on it alone)
REFERENCE_SEED = 42   # the reference's train.py --seed: its per-user PRISM split is made there, with it
_TEST_SPLITS = {"valid", "valid1", "valid2", "validation", "test"}
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")
_IGNORED_PREFIXES = ("readme", "license", "licence")


# --- reading published files ---------------------------------------------------
def _read_records(uri: str) -> list[dict]:
    """All records of one .jsonl/.json (JSON lines, optionally gzipped) or .parquet file, local or s3://."""
    fs, path = storage.resolve(uri)
    try:
        if path.endswith(".parquet"):
            return pq.read_table(path, filesystem=fs).to_pylist()
        with fs.open_input_stream(path) as f:   # pyarrow decompresses .gz by the extension
            data = f.read().decode("utf-8-sig")  # a byte-order mark is fine
    except FileNotFoundError:
        raise UserError(f"no file at {uri}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{uri} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise storage.StorageError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None
    except pa.ArrowException as e:
        raise UserError(f"{uri} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    records = []
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{uri} line {n} is not valid JSON ({e.msg})") from None
    return records


def _field(record: dict, name: str, where: str):
    """record[name], or a one-line error naming the file, the record and the field."""
    if not isinstance(record, dict) or record.get(name) is None:
        raise UserError(f"{where} has no field {name!r}")
    return record[name]


def _data_files(source: str) -> list[str]:
    """The data files under a folder (sorted, recursive) or the one file given.  Anything else under
    the folder is refused by name, so no file is skipped silently."""
    fs, path = storage.resolve(source)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [source]
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"no dataset files at {source}")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise storage.StorageError(f"cannot reach {source}: {str(e).splitlines()[0]}") from None
    names = {f.base_name for f in found if f.type == pafs.FileType.File}
    if "state.json" in names and any(n.endswith(".arrow") for n in names):
        raise UserError(f"{source} is a `datasets.save_to_disk` folder; write it as Parquet "
                        f"(dataset.to_parquet(...)) or point --source at the original files")
    files, ignored = [], []
    for f in sorted(found, key=lambda f: f.path):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(path):].lstrip("/")
        low = f.base_name.lower()
        if low.startswith(".") or low.startswith(_IGNORED_PREFIXES) or rel.startswith("."):
            ignored.append(rel)
        elif low.endswith(_DATA_SUFFIXES):
            files.append(storage.join(source, rel))
        else:
            raise UserError(f"{storage.join(source, rel)} is not a dataset file this command reads "
                            f"(JSON lines .json/.jsonl[.gz] or .parquet); move it out of --source")
    if ignored:
        log.info("ignoring %d documentation/hidden file(s) under %s: %s", len(ignored), source,
                 ", ".join(ignored[:5]))
    return files


def _message_list(messages: list[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in messages]


def _pairs_table(rows: list[dict]) -> pa.Table:
    rows = sorted(rows, key=lambda r: (r[C.USER_ID], r[C.SPLIT], r[C.PAIR_ID]))
    cols = {c: pa.array([r[c] for r in rows], pa.string()) for c in (C.USER_ID, C.PAIR_ID, C.CONV_ID, C.SPLIT)}
    cols[C.PROMPT] = pa.array([r[C.PROMPT] for r in rows], C.PROMPT_TYPE)
    cols[C.CHOSEN] = pa.array([r[C.CHOSEN] for r in rows], pa.string())
    cols[C.REJECTED] = pa.array([r[C.REJECTED] for r in rows], pa.string())
    return C.normalize_pairs(pa.table(cols), what="prepared pairs")


def _user_rng(seed: int, user_id: str) -> np.random.Generator:
    """A generator per user: the split of one user does not depend on which other users exist."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --- PRISM -----------------------------------------------------------------------
def prism_conversation_pairs(record: dict, where: str) -> list[dict]:
    """Pairs of one PRISM conversation record (no user filter, no split yet)."""
    user_id = str(_field(record, "user_id", where))
    conv_id = str(_field(record, "conversation_id", where))
    turns: dict[int, list[dict]] = defaultdict(list)
    for k, utt in enumerate(_field(record, "conversation_history", where)):
        at = f"{where} conversation_history[{k}]"
        turns[int(_field(utt, "turn", at))].append(utt)
        if _field(utt, "role", at) == "user":
            _field(utt, "content", at)
        else:
            _field(utt, "if_chosen", at)
    context: list[tuple[str, str]] = []
    pairs = []
    for t in sorted(turns):
        users = [u for u in turns[t] if u["role"] == "user"]
        replies = sorted((u for u in turns[t] if u["role"] != "user"), key=lambda u: u.get("within_turn_id") or 0)
        chosen = [u for u in replies if u["if_chosen"] and str(u.get("content") or "").strip()]
        if not users or not chosen:
            break  # the conversation cannot continue coherently without the turn's user message and chosen reply
        prompt = _message_list(context + [("user", str(users[0]["content"]))])
        for k, rej in enumerate(u for u in replies if not u["if_chosen"]):
            if not str(rej.get("content") or "").strip():
                continue
            rid = rej.get("within_turn_id")
            pairs.append({C.USER_ID: user_id, C.CONV_ID: conv_id, C.PROMPT: prompt,
                          C.PAIR_ID: f"{conv_id}-t{t}-r{rid if rid is not None else k}",
                          C.CHOSEN: str(chosen[0]["content"]), C.REJECTED: str(rej["content"])})
        context += [("user", str(users[0]["content"])), ("assistant", str(chosen[0]["content"]))]
    return pairs


def split_by_conversation(pairs: list[dict], seed: int = SPLIT_SEED) -> list[dict]:
    """Per user, half of the conversations (rounded up) -> train, the rest -> test."""
    convs: dict[str, list[str]] = defaultdict(list)
    for p in pairs:
        if p[C.CONV_ID] not in convs[p[C.USER_ID]]:
            convs[p[C.USER_ID]].append(p[C.CONV_ID])
    split_of = {}
    for user, ids in convs.items():
        ids = sorted(ids)
        order = _user_rng(seed, user).permutation(len(ids))
        n_train = (len(ids) + 1) // 2
        for rank, i in enumerate(order):
            split_of[(user, ids[i])] = C.TRAIN if rank < n_train else C.TEST
    return [{**p, C.SPLIT: split_of[(p[C.USER_ID], p[C.CONV_ID])]} for p in pairs]


def prepare_prism(source: str, min_conversations: int = MIN_CONVERSATIONS, seed: int = SPLIT_SEED) -> pa.Table:
    conv_uri, survey_uri = _prism_files(source)
    pairs = []
    for n, rec in enumerate(_read_records(conv_uri), 1):
        pairs += prism_conversation_pairs(rec, f"{conv_uri} line {n}")
    if storage.exists(survey_uri):  # the reference keeps only users who took the survey
        surveyed = {str(_field(r, "user_id", f"{survey_uri} line {n}"))
                    for n, r in enumerate(_read_records(survey_uri), 1)}
        pairs = [p for p in pairs if p[C.USER_ID] in surveyed]
    n_convs: dict[str, set] = defaultdict(set)
    for p in pairs:
        n_convs[p[C.USER_ID]].add(p[C.CONV_ID])
    keep = {u for u, cs in n_convs.items() if len(cs) >= min_conversations}
    log.info("PRISM: %d pairs from %d users; keeping %d users with >= %d conversations",
             len(pairs), len(n_convs), len(keep), min_conversations)
    pairs = [p for p in pairs if p[C.USER_ID] in keep]
    if not pairs:
        raise UserError(f"no PRISM user in {source} has {min_conversations} or more conversations with pairs")
    return _pairs_table(split_by_conversation(pairs, seed))


def _prism_files(source: str) -> tuple[str, str]:
    src = source.rstrip("/")
    if src.endswith(PRISM_CONVERSATIONS):
        src = src[: -len(PRISM_CONVERSATIONS)].rstrip("/")
    conv_uri, survey_uri = storage.join(src, PRISM_CONVERSATIONS), storage.join(src, PRISM_SURVEY)
    if not storage.exists(conv_uri):
        raise UserError(f"no {PRISM_CONVERSATIONS} in {source} (expected the files of HannahRoseKirk/prism-alignment)")
    return conv_uri, survey_uri


def _reference_ids(user: str, items: list[list[dict]]) -> list[dict]:
    """Number a user's pairs `<user>/<position>` in the given order (pair_id order = the reference's)."""
    rows, k = [], 0
    for group in items:
        for p in group:
            rows.append({**p, C.PAIR_ID: f"{user}/{k:06d}"})
            k += 1
    return rows


def prepare_prism_reference(source: str, min_conversations: int = MIN_CONVERSATIONS,
                            seed: int = REFERENCE_SEED) -> pa.Table:
    """PRISM as the reference's preprocess_prism.py + train.py build it (see the module docstring)."""
    conv_uri, survey_uri = _prism_files(source)
    if not storage.exists(survey_uri):
        raise UserError(f"--reference needs {PRISM_SURVEY} next to {PRISM_CONVERSATIONS} (the reference keeps "
                        f"the users who took the survey)")
    surveyed = set()
    for n, r in enumerate(_read_records(survey_uri), 1):
        if r.get("num_completed_conversations", 1) != 0:
            surveyed.add(str(_field(r, "user_id", f"{survey_uri} line {n}")))
    dialogs: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    empty = 0
    for n, rec in enumerate(_read_records(conv_uri), 1):
        where = f"{conv_uri} line {n}"
        user, conv_id = str(_field(rec, "user_id", where)), str(_field(rec, "conversation_id", where))
        if user not in surveyed:
            continue
        turns: dict[int, dict] = defaultdict(lambda: {"user": [], "chosen": [], "rejected": []})
        for k, utt in enumerate(_field(rec, "conversation_history", where)):
            at = f"{where} conversation_history[{k}]"
            t = turns[int(_field(utt, "turn", at))]
            if _field(utt, "role", at) == "user":
                t["user"].append(str(_field(utt, "content", at)))
            else:
                t["chosen" if _field(utt, "if_chosen", at) else "rejected"].append(str(utt.get("content") or ""))
        pairs, context = [], []
        for t in sorted(turns):
            turn = turns[t]
            if not (turn["user"] and turn["chosen"] and turn["rejected"]):
                continue  # an unqualified turn: no pairs, and not part of later contexts
            prompt = _message_list(context + [("user", turn["user"][0])])
            for rejected in turn["rejected"]:
                if turn["chosen"][0].strip() and rejected.strip():
                    pairs.append({C.USER_ID: user, C.CONV_ID: conv_id, C.PROMPT: prompt,
                                  C.CHOSEN: turn["chosen"][0], C.REJECTED: rejected})
                else:
                    empty += 1
            context += [("user", turn["user"][0]), ("assistant", turn["chosen"][0])]
        if pairs:
            dialogs[user].append((conv_id, pairs))
    rows = []
    for user, convs in dialogs.items():
        if len(convs) < min_conversations:
            continue
        order = [c for c, _ in convs]
        random.Random(reference_user_seed(seed, user)).shuffle(order)
        by_id = dict(convs)
        n_train = len(order) // 2
        items = [[{**p, C.SPLIT: C.TRAIN if i < n_train else C.TEST} for p in by_id[c]] for i, c in enumerate(order)]
        rows += _reference_ids(user, items)
    log.info("PRISM (reference preprocessing): %d pairs of %d users (%d with >= %d conversations); "
             "%d pairs with an empty reply skipped", len(rows), len(dialogs),
             len({r[C.USER_ID] for r in rows}), min_conversations, empty)
    if not rows:
        raise UserError(f"no PRISM user in {source} has {min_conversations} or more conversations with pairs")
    return _pairs_table(rows)


def reference_user_seed(seed: int, user_id: str) -> int:
    from mrm_ray.core.reference import user_seed
    return user_seed(seed, user_id)


# --- Reddit TL;DR ------------------------------------------------------------------
def _split_of(record: dict, file: str) -> str | None:
    """train / test from the record's `split` (OpenAI files) or else the file name (HF export)."""
    raw = str(record.get("split") or "").lower()
    if not raw:
        name = file.rsplit("/", 1)[-1].lower()
        raw = "train" if "train" in name else "validation" if "valid" in name else ""
    if raw == "train":
        return C.TRAIN
    return C.TEST if raw in _TEST_SPLITS else None


def reddit_prompt(info: dict, post_only: bool = False) -> str:
    post = str(info.get("post") or "").strip()
    if post_only or not info.get("title"):
        return post
    sub = f"SUBREDDIT: r/{info['subreddit']}\n" if info.get("subreddit") else ""
    return f"{sub}TITLE: {info['title']}\nPOST: {post}"


def reddit_pair(record: dict, file: str, where: str, post_only: bool = False) -> dict | None:
    """One pair of a comparison record, or None for a row that is not a Reddit comparison."""
    if isinstance(record, dict) and "axes" in record and "summaries" not in record:
        raise UserError(f"{where} is a record of the summarize_from_feedback `axis` files (ratings of single "
                        f"summaries); `mrm prepare reddit` reads the `comparisons` files")
    worker = str(_field(record, "worker", where))
    info = _field(record, "info", where)
    summaries = _field(record, "summaries", where)
    choice = _field(record, "choice", where)
    split = _split_of(record, file)
    if split is None:
        raise UserError(f"{where} has no usable field 'split' (train/valid1/valid2) and its file name names none")
    if not str(info.get("post") or "").strip():
        return None  # CNN/DM article comparisons share the files; they have no post
    if len(summaries) != 2 or int(choice) not in (0, 1):
        raise UserError(f"{where} field 'summaries' must hold 2 summaries and 'choice' be 0 or 1")
    texts = [str(_field(s, "text", f"{where} summaries[{k}]")).strip() for k, s in enumerate(summaries)]
    chosen, rejected = texts[int(choice)], texts[1 - int(choice)]
    if not chosen or not rejected or chosen == rejected:
        return None
    post_id = str(info.get("id") or hashlib.sha1(info["post"].encode()).hexdigest()[:12])
    digest = hashlib.sha1(f"{chosen}\0{rejected}".encode()).hexdigest()[:10]
    # conv_id = the post: one worker's comparisons of the same post stay on one side of support/query.
    return {C.USER_ID: worker, C.PAIR_ID: f"{worker}-{post_id}-{digest}", C.CONV_ID: post_id, C.SPLIT: split,
            C.PROMPT: _message_list([("user", reddit_prompt(info, post_only))]), C.CHOSEN: chosen, C.REJECTED: rejected}


def prepare_reddit_reference(source: str) -> pa.Table:
    """Reddit TL;DR as the reference's preprocess_reddit.py builds it (see the module docstring)."""
    files = _data_files(source)
    if not files:
        raise UserError(f"no .json/.jsonl/.parquet comparison files under {source}")
    lists: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {C.TRAIN: [], C.TEST: []})
    empty = 0
    for file in files:
        for n, rec in enumerate(_read_records(file), 1):
            where = f"{file} record {n}"
            if isinstance(rec, dict) and "axes" in rec and "summaries" not in rec:
                reddit_pair(rec, file, where)  # refuses with the reason
            worker, info = str(_field(rec, "worker", where)), _field(rec, "info", where)
            summaries, choice = _field(rec, "summaries", where), int(_field(rec, "choice", where))
            split = _split_of(rec, file)
            if split is None:
                raise UserError(f"{where} has no usable field 'split' (train/valid1/valid2) and its file name names none")
            if len(summaries) != 2 or choice not in (0, 1):
                raise UserError(f"{where} field 'summaries' must hold 2 summaries and 'choice' be 0 or 1")
            texts = [str(_field(s, "text", f"{where} summaries[{k}]")) for k, s in enumerate(summaries)]
            if not texts[choice].strip() or not texts[1 - choice].strip():
                empty += 1
                continue
            lists[worker][split].append({C.USER_ID: worker, C.SPLIT: split, C.CHOSEN: texts[choice],
                                         C.REJECTED: texts[1 - choice],
                                         C.PROMPT: _message_list([("user", str(info.get("post") or ""))])})
    rows = []
    for worker, by_split in lists.items():
        if by_split[C.TRAIN] and by_split[C.TEST]:
            rows += [{**r, C.CONV_ID: r[C.PAIR_ID]} for r in _reference_ids(worker, [by_split[C.TRAIN], by_split[C.TEST]])]
    log.info("Reddit TL;DR (reference preprocessing): %d pairs of %d workers present in both splits "
             "(of %d); %d comparisons with an empty summary skipped", len(rows),
             len({r[C.USER_ID] for r in rows}), len(lists), empty)
    if not rows:
        raise UserError(f"no worker in {source} has comparisons in both the train and the validation split")
    return _pairs_table(rows)


def prepare_reddit(source: str, post_only: bool = False) -> pa.Table:
    files = _data_files(source)
    if not files:
        raise UserError(f"no .json/.jsonl/.parquet comparison files under {source}")
    pairs: dict[str, dict] = {}
    skipped = 0
    for file in files:
        for n, rec in enumerate(_read_records(file), 1):
            pair = reddit_pair(rec, file, f"{file} record {n}", post_only)
            if pair is None:
                skipped += 1
            else:
                pairs.setdefault(pair[C.PAIR_ID], pair)  # a comparison repeated across batches counts once
    splits: dict[str, set] = defaultdict(set)
    for p in pairs.values():
        splits[p[C.USER_ID]].add(p[C.SPLIT])
    keep = {w for w, s in splits.items() if s == {C.TRAIN, C.TEST}}
    log.info("Reddit TL;DR: %d pairs from %d workers (%d rows without a Reddit post or with equal summaries "
             "skipped); keeping %d workers present in both train and validation", len(pairs), len(splits),
             skipped, len(keep))
    rows = [p for p in pairs.values() if p[C.USER_ID] in keep]
    if not rows:
        raise UserError(f"no worker in {source} has comparisons in both the train and the validation split")
    return _pairs_table(rows)


# --- command line --------------------------------------------------------------------
def prepare(dataset: str, source: str, out: str, min_conversations: int = MIN_CONVERSATIONS,
            seed: int | None = None, post_only: bool = False, reference: bool = False,
            overwrite: bool = False) -> dict:
    """Convert the published `dataset` (prism or reddit) files under `source` into the pairs table `out`.

    seed None: SPLIT_SEED, or with reference REFERENCE_SEED (the reference train.py's --seed, which
    must match mrm train's seed).  Returns a summary.
    """
    if dataset not in ("prism", "reddit"):
        raise UserError(f"unknown dataset {dataset!r}; choose prism or reddit")
    if min_conversations < 1:
        raise UserError("--min-conversations must be >= 1")
    storage.check_output(out, "prepare", [source], overwrite)   # before any work
    if dataset == "prism":
        seed = seed if seed is not None else (REFERENCE_SEED if reference else SPLIT_SEED)
        table = (prepare_prism_reference if reference else prepare_prism)(source, min_conversations, seed)
    elif reference:
        if post_only:
            log.info("--reference already uses the bare post as the prompt")
        table = prepare_reddit_reference(source)
    else:
        table = prepare_reddit(source, post_only)
    storage.write_table(table, out, "prepare", overwrite, inputs=[source])
    users = pc.count_distinct(table.column(C.USER_ID)).as_py()
    n_test = int(pc.sum(pc.equal(table.column(C.SPLIT), C.TEST)).as_py() or 0)
    log.info("wrote %d pairs (%d train, %d test) of %d users to %s", table.num_rows, table.num_rows - n_test,
             n_test, users, out)
    return {"pairs": table.num_rows, "train_pairs": table.num_rows - n_test, "test_pairs": n_test, "users": users,
            "out": out}
