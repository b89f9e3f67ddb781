"""`mrm train` on Ray Train (mrm_ray.train_ray): sharding, equivalence, fault tolerance, resume, S3.

One synthetic population (1,000 users) serves every Ray test.  Because a
meta-batch is a hash of (seed, epoch, user id) and RPO's quantile is taken over
the gathered losses, 2 gloo workers take exactly the steps of the single-process
trainer, and a run that lost a worker, or was re-run after dying, continues
exactly where its checkpoint left off: the tests assert on the parameters.

Workers are killed by PID: the RayTrainWorker processes of this test's own Ray
cluster (descendants of this process), never a process found by name alone.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from mrm_ray import cli, train, train_ray
from mrm_ray import config as config_mod
from mrm_ray.data import contract as C
from mrm_ray.core import splits
from mrm_ray.data import runs, shards, storage
from mrm_ray.errors import UserError
from mrm_ray.synth import write_embedding_population
from helpers import assert_continued, assert_heads_close, registered_checkpoint

EPOCHS = 6
# 2 workers x 0.5 CPU leave one of the 2 CPUs free for the driver.
RAY_ARGS = [f"epochs={EPOCHS}", "num_workers=2", "cpus_per_worker=0.5"]


def mrm_train(emb, run, *overrides, local=False) -> int:
    return cli.main(["train", "--embeddings", str(emb), "--out", str(run), *(["--local"] if local else []),
                     *RAY_ARGS, *overrides])


def write_population(uri: str) -> None:
    """1,000 synthetic users, plus 8 seen users with a single train pair (to be skipped and counted)."""
    write_embedding_population(uri, users=1000, pairs_per_user=40, dim=16, seed=0)
    synth = storage.read_table(uri)
    ids = [u for u in (f"few{i:03d}" for i in range(100)) if shards.seen_mask([u], 0, 0.5)[0]][:8]
    rng = np.random.default_rng(1)
    rows = [(u, f"{u}-{j}", f"{u}-c{j}", C.TRAIN if j == 0 else C.TEST) for u in ids for j in range(3)]
    emb = lambda: pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(16 * len(rows)), pa.float32()), 16)
    extra = pa.table({C.USER_ID: [r[0] for r in rows], C.PAIR_ID: [r[1] for r in rows],
                      C.CONV_ID: [r[2] for r in rows], C.SPLIT: [r[3] for r in rows],
                      C.CHOSEN_EMB: emb(), C.REJECTED_EMB: emb()})
    truth = storage.read_table(storage.join(uri, "_truth"))
    with storage.atomic_output(uri, "synth", overwrite=True) as staging:   # one table: the synth rows + the extra
        storage.write_staged(pa.concat_tables([synth, extra.cast(synth.schema)]), staging)
        storage.write_staged(truth, storage.join(staging, "_truth"))


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pop") / "emb"
    write_population(str(out))
    return out


@pytest.fixture(scope="module")
def reference(population, tmp_path_factory, ray_local) -> Path:
    """`mrm train` with 2 gloo workers, uninterrupted; given relative paths, as a user types them (Ray
    Train's workers run in other working directories)."""
    root = tmp_path_factory.mktemp("ref")
    here = os.getcwd()
    os.chdir(root)
    try:
        assert mrm_train(os.path.relpath(population, root), "run") == 0
    finally:
        os.chdir(here)
    return root / "run"


# --- the data path, without Ray ---------------------------------------------------------
def test_shards_split_users_not_pairs(population, tmp_path):
    """The driver's one pass writes the seen users' train rows in buckets of whole users; each worker reads
    its buckets: every seen user on exactly one worker, with all its train pairs, caps applied."""
    cfg = config_mod.load_config(overrides=["seen_train_limit=12"])
    run = str(tmp_path / "run")
    scan = train.scan_and_shard(str(population), run, cfg)
    seen = train.seen_users(run)
    world = 3
    parts = [train.load_seen(run, cfg, seen, scan["dim"], buckets=shards.buckets_of_rank(cfg.shard_buckets, r, world))
             for r in range(world)]
    ids = [set(s.user_ids) for s in parts]
    assert all(ids) and sum(map(len, ids)) == len(set.union(*ids))  # disjoint, none empty
    # Skipped seen users (fewer than min_train_pairs) are in no shard.
    assert not any(u.startswith("few") for u in set.union(*ids))
    assert set.union(*ids) == set(seen.column("user_id").to_pylist())
    # the single-process loader, from the whole table in memory: the same rows, user for user
    table = C.normalize_embeddings(storage.read_table(str(population)))
    table = table.filter(pc.and_(pc.is_in(table.column(C.USER_ID), seen.column("user_id")),
                                 pc.not_equal(table.column(C.SPLIT), C.TEST)))
    expected = train.cap_train(shards.user_pairs_from_table(table, seed=cfg.seed), cfg, cfg.seen_train_limit)
    assert sum(s.n_pairs for s in parts) == expected.n_pairs
    assert max(s.counts().max() for s in parts) == 12
    for s in parts:
        for j in np.random.default_rng(0).choice(s.n_users, 5, replace=False):
            i = int(np.flatnonzero(expected.user_ids == s.user_ids[j])[0])
            torch.testing.assert_close(s.diff[s.offsets[j]:s.offsets[j + 1]],
                                       expected.diff[expected.offsets[i]:expected.offsets[i + 1]])


def test_the_start_holds_out_the_carve_only_when_asked(population, tmp_path):
    """basis.use_carve=false: the data-driven start is the same whatever the validation carve's pairs say (it
    is the carve meta-training holds out); by default the start reads them.  The check: flip every carve
    pair (chosen <-> rejected) and fit the start on both tables."""
    table = storage.read_table(str(population))
    train_rows = table.filter(pc.equal(table.column(C.SPLIT), C.TRAIN))
    cfg = config_mod.load_config()
    grouped = shards.user_pairs_from_table(train_rows, seed=cfg.seed)
    ids = np.sort(np.unique(train_rows.column(C.PAIR_ID).to_numpy(zero_copy_only=False).astype(str)))
    carve = ids[grouped.pair_order[splits.validation_mask(grouped, cfg.val_ratio, cfg.seed)]]
    flip = pc.is_in(table.column(C.PAIR_ID), pa.array(carve)).to_numpy(zero_copy_only=False)
    assert 0 < flip.sum() < 0.25 * (~pc.equal(table.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)).sum()
    chosen, rejected = (table.column(c).combine_chunks() for c in (C.CHOSEN_EMB, C.REJECTED_EMB))
    swapped = pa.array(flip)
    flipped = table.set_column(table.schema.get_field_index(C.CHOSEN_EMB), C.CHOSEN_EMB,
                               pc.if_else(swapped, rejected, chosen))
    flipped = flipped.set_column(flipped.schema.get_field_index(C.REJECTED_EMB), C.REJECTED_EMB,
                                 pc.if_else(swapped, chosen, rejected))
    with storage.atomic_output(str(tmp_path / "flipped"), "synth") as staging:
        storage.write_staged(flipped, staging)

    def start(emb, use_carve: bool) -> dict:
        cfg = config_mod.load_config(overrides=[f"basis.use_carve={str(use_carve).lower()}"])
        run = str(tmp_path / f"run-{Path(emb).name}-{use_carve}")
        scan = train.scan_and_shard(emb, run, cfg)
        return train.data_start(cfg, run, train.seen_users(run), scan["dim"])[0]

    held_out, flipped_held_out = start(str(population), False), start(str(tmp_path / "flipped"), False)
    for k in held_out:
        torch.testing.assert_close(held_out[k], flipped_held_out[k], rtol=0, atol=0)
    read, flipped_read = start(str(population), True), start(str(tmp_path / "flipped"), True)
    assert not torch.allclose(read["layers.0"][0], flipped_read["layers.0"][0], atol=1e-3)


def test_latest_state_skips_a_half_written_checkpoint(tmp_path):
    base = tmp_path / "checkpoints" / train_ray.RUN_NAME
    for epoch in (1, 2):
        (base / f"epoch-{epoch:06d}").mkdir(parents=True)
        st = train_ray.meta.TrainState(epoch=epoch, head={"theta0": torch.zeros(2)})
        (base / f"epoch-{epoch:06d}" / train_ray.STATE_FILE).write_bytes(runs.state_to_bytes(st))
    (base / "epoch-000003").mkdir()
    (base / "epoch-000003" / train_ray.STATE_FILE).write_bytes(runs.state_to_bytes(st)[:100])  # crash mid-upload
    assert train_ray.latest_state(str(tmp_path)).epoch == 2
    assert train_ray.latest_state(str(tmp_path / "nowhere")) is None


def test_nan_embedding_refused_before_any_worker(tmp_path, capsys):
    t = pa.table({C.USER_ID: ["a", "a", "b"], C.PAIR_ID: ["1", "2", "3"],
                  C.CHOSEN_EMB: pa.array([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]], pa.list_(pa.float32(), 2)),
                  C.REJECTED_EMB: pa.array([[1.0, 0.0]] * 3, pa.list_(pa.float32(), 2))})
    storage.write_table(t, str(tmp_path / "emb"))
    rc = cli.main(["train", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "run"), *RAY_ARGS])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mrm ")]
    assert rc == 2 and len(lines) == 1 and "NaN" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_may_change_placement_not_math(tmp_path):
    """A run directory resumes on another number of workers; any other change of config is refused."""
    run = str(tmp_path / "run")
    runs.save_config(run, config_mod.load_config(overrides=["epochs=6", "num_workers=2"]))

    def resolve(*argv):   # as `mrm train` resolves its command line
        o = cli.build_parser("train").parse_args(["train", "--embeddings", "e", "--out", run, *argv])
        overrides = config_mod.parse_overrides(o.overrides) | ({"num_workers": o.workers} if o.workers else {})
        asked = config_mod.load_config(o.preset, o.config, overrides)
        return train.resolve_config(asked, config_mod.asks_for_config(o.preset, o.config, overrides), run,
                                    set(overrides) & set(config_mod.PLACEMENT_KEYS))

    cfg, resuming = resolve("--workers", "3", "cpus_per_worker=0.25")
    assert resuming and (cfg.num_workers, cfg.cpus_per_worker, cfg.epochs) == (3, 0.25, 6)
    cfg, _ = resolve()
    assert (cfg.num_workers, cfg.epochs) == (2, 6)
    cfg, _ = resolve("epochs=6", "max_failures=0")  # the original overrides again, plus a placement key
    assert (cfg.num_workers, cfg.max_failures) == (2, 0)
    with pytest.raises(UserError, match="different config"):
        resolve("epochs=7")


# --- Ray Train ---------------------------------------------------------------------------
def test_two_workers_match_one_process(population, reference, tmp_path):
    """2 gloo workers on Ray Train == the single-process trainer, step for step."""
    local = tmp_path / "local"
    assert mrm_train(population, local, local=True) == 0
    one = runs.state_from_bytes((local / "checkpoints" / "local" / "state.pt").read_bytes())
    two = train_ray.latest_state(str(reference))
    assert two.epoch == one.epoch == EPOCHS
    assert_heads_close(two.head, one.head)
    assert_heads_close(two.best_head, one.best_head)
    for h1, h2 in zip(one.history, two.history):
        assert h1["epoch"] == h2["epoch"] and abs(h1["val_accuracy"] - h2["val_accuracy"]) < 1e-6
        assert abs(h1.get("meta_loss", 0.0) - h2.get("meta_loss", 0.0)) < 1e-5  # epoch 0 (the start) trains nothing
    assert json.loads((reference / "model.json").read_text())["best_epoch"] == two.best_epoch


def test_two_workers_beat_shared_bt_on_unseen_users(population, reference):
    assert cli.main(["evaluate", "--run", str(reference), "--embeddings", str(population)]) == 0
    m = json.loads((reference / "metrics.json").read_text())
    bt = m["baselines"]["shared_bt"]
    assert m["unseen"]["users"] > 400
    assert m["unseen"]["accuracy"] > bt["unseen"]["accuracy"] + 0.02, (m["unseen"], bt["unseen"])
    # Users with < min_train_pairs train pairs were skipped and counted, not a crash.
    info = json.loads((reference / "model.json").read_text())
    users = storage.read_table(str(reference / runs.USERS))
    skipped_seen = pc.sum(pc.and_(users.column("seen"), users.column("skipped"))).as_py()
    assert skipped_seen >= 8 and info["skipped_users"] == pc.sum(users.column("skipped")).as_py()
    assert info["seen_users"] == pc.sum(users.column("seen")).as_py() - skipped_seen


# --- killing a worker ----------------------------------------------------------------------
# Small meta-batches (the reference's 2 users) make an epoch last long enough (~1 s on 2 CPUs)
# for a worker to be killed mid-run after Ray Train has registered a checkpoint.
KILL_ARGS = ["tasks_per_batch=2", "epochs=10"]


@pytest.fixture(scope="module")
def single_process(population, tmp_path_factory) -> train_ray.meta.TrainState:
    """The uninterrupted single-process run of KILL_ARGS (== 2 workers, see the test above)."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert mrm_train(population, run, *KILL_ARGS, local=True) == 0
    return runs.state_from_bytes((run / "checkpoints" / "local" / "state.pt").read_bytes())


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of THIS process's Ray cluster."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(pid)
        except OSError:
            pass
    return sorted(pids)


@contextmanager
def kill_a_worker(run, after_epoch: int, timeout: float = 400):
    """In the background: once a checkpoint of epoch >= after_epoch is registered, SIGKILL a train worker.

    Yields a dict: the killed PID, the history of the checkpoint registered at
    that moment, and the PIDs of the workers that replaced the killed group.
    """
    done = {"killed": None, "history": None, "replacements": []}
    stop = threading.Event()

    def watch():
        t0 = time.time()
        while not stop.is_set() and time.time() - t0 < timeout:
            ckpt, pids = registered_checkpoint(str(run)), train_worker_pids()
            if ckpt is not None and ckpt.rsplit("/", 1)[1] >= f"epoch-{after_epoch:06d}" and pids:
                done["history"] = runs.state_from_bytes(
                    storage.read_bytes(storage.join(ckpt, train_ray.STATE_FILE))).history
                os.kill(pids[-1], signal.SIGKILL)
                done["killed"] = pids
                break
            time.sleep(0.05)
        while not stop.is_set() and done["killed"]:
            new = [p for p in train_worker_pids() if p not in done["killed"]]
            if new:
                done["replacements"] = new
                break
            time.sleep(0.1)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield done
    finally:
        stop.set()
        th.join(timeout=10)


def test_worker_killed_mid_run_recovers(population, single_process, tmp_path):
    """FailureConfig(max_failures=2): the group restarts from the registered checkpoint and ends as
    an uninterrupted run would."""
    run = tmp_path / "run"
    with kill_a_worker(run, after_epoch=2) as k:
        assert mrm_train(population, run, *KILL_ARGS, "max_failures=2") == 0
    assert k["killed"] and k["replacements"], k
    assert_continued(train_ray.latest_state(str(run)), k, single_process)


def test_s3_run_interrupted_resumed_and_evaluated(single_process, ray_local, s3_bucket):
    """A run directory on S3: a run that dies (max_failures=0) is continued by re-running the command,
    here on ONE worker, from the checkpoint Ray Train registered on S3; then evaluated from S3."""
    import ray.train

    emb, run = f"{s3_bucket}/emb", f"{s3_bucket}/runs/r1"
    write_population(emb)  # the same table as `population`
    with kill_a_worker(run, after_epoch=2) as k:
        with pytest.raises(ray.train.TrainingFailedError):
            mrm_train(emb, run, *KILL_ARGS, "max_failures=0")
    assert k["killed"] and train_ray.latest_state(run).epoch < 10
    assert mrm_train(emb, run, *KILL_ARGS, "max_failures=0", "num_workers=1") == 0
    final = train_ray.latest_state(run)
    assert_continued(final, k, single_process)
    # Once more, no overrides, on the finished directory: nothing to train, the model stays.
    assert cli.main(["train", "--embeddings", emb, "--out", run]) == 0
    assert train_ray.latest_state(run).history == final.history

    assert cli.main(["evaluate", "--run", run, "--embeddings", emb]) == 0
    m = storage.read_json(storage.join(run, runs.METRICS))
    assert m["unseen"]["users"] > 400 and m["unseen"]["accuracy"] > m["baselines"]["shared_bt"]["unseen"]["accuracy"]
    for name in (runs.CONFIG, runs.MODEL, runs.HISTORY, runs.USERS):
        assert storage.exists(storage.join(run, name)), name
