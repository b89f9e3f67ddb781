"""A million users end to end on one machine: synth -> train (2 Ray Train workers) -> evaluate -> score.

    python benchmarks/million.py                                  # 1,000,000 users, d=32, in /tmp/mrm-1m
    python benchmarks/million.py --users 20000 --workdir /tmp/mrm-20k   # a quick look

Each stage runs as its `mrm` command in a subprocess, as a user would run it;
the script prints the command, its wall time and its peak memory: the largest
sum of proportional set sizes (PSS) over the command's whole process tree (Linux /proc) (the driver,
the local Ray cluster it starts, every Ray worker), sampled every 0.2 s.  The
candidates for `mrm score` (each test pair's two responses, for its user) are
written by a streamed pass over the embeddings table, not collected in memory.
No stage collects the table on its driver: training shards it in one
streamed pass, workers read their buckets, evaluation works bucket by bucket,
scoring routes K floats per row through Ray tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrm_ray.data import contract as C  # noqa: E402
from mrm_ray.data import storage  # noqa: E402


def tree_pss(root: int) -> int:
    """Proportional set size of a process and all its descendants (Linux /proc).  PSS, not RSS:
    Ray's processes map the same shared memory (the object store, libraries), which RSS would
    count once per process."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in tree}
        tree |= frontier
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_stage(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mrm_ray.cli", *argv]
    print(f"$ mrm {' '.join(argv)}", flush=True)
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_pss(p.pid))
    threading.Thread(target=sample, daemon=True).start()
    out = p.stdout.read()
    rc = p.wait()
    done.set()
    seconds = time.time() - t0
    last = [line for line in out.splitlines() if line.strip()][-3:]
    if rc != 0:
        print(out[-4000:])
        raise SystemExit(f"{name} failed with exit status {rc}")
    print("  " + "\n  ".join(last))
    print(f"  {name}: {seconds:.0f} s wall, peak memory {peak[0] / 2**30:.2f} GiB (PSS, process tree)", flush=True)
    return {"stage": name, "seconds": round(seconds, 1), "peak_pss_gib": round(peak[0] / 2**30, 2)}


def write_candidates(embeddings: str, out: str) -> int:
    """Each test pair's chosen and rejected response as two candidates of its user, streamed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = 0
    with storage.atomic_output(out, "api", overwrite=True) as staging:
        fs, path = storage.resolve(staging)
        writer = None
        for batch in storage.iter_batches(embeddings, columns=[C.USER_ID, C.PAIR_ID, C.SPLIT, C.CHOSEN_EMB,
                                                               C.REJECTED_EMB], batch_rows=262144):
            t = pa.Table.from_batches([batch])
            t = t.filter(pc.equal(t.column(C.SPLIT), C.TEST))
            if t.num_rows == 0:
                continue
            part = pa.table({
                C.USER_ID: pa.concat_arrays([t.column(C.USER_ID).combine_chunks()] * 2),
                C.CANDIDATE_ID: pa.concat_arrays([pc.binary_join_element_wise(t.column(C.PAIR_ID), s, "/")
                                                  .combine_chunks() for s in ("chosen", "rejected")]),
                C.EMB: pa.concat_arrays([t.column(C.CHOSEN_EMB).combine_chunks(),
                                         t.column(C.REJECTED_EMB).combine_chunks()])})
            writer = writer or pq.ParquetWriter(f"{path}/part-00000.parquet", part.schema, filesystem=fs)
            writer.write_table(part)
            rows += part.num_rows
        if writer is not None:
            writer.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--pairs-per-user", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/mrm-1m")
    ap.add_argument("--train", nargs="*", default=["num_workers=2", "tasks_per_batch=1024", "epochs=3"],
                    metavar="KEY=VALUE", help="mrm train overrides")
    args = ap.parse_args()
    w = Path(args.workdir)
    w.mkdir(parents=True, exist_ok=True)
    emb, run, cands, scores = (str(w / n) for n in ("emb", "run", "cands", "scores"))
    results = [run_stage("synth", ["synth", "--kind", "embedding", "--users", str(args.users), "--dim",
                                   str(args.dim), "--pairs-per-user", str(args.pairs_per_user), "--out", emb,
                                   "--overwrite"])]
    if Path(run).exists():
        import shutil
        shutil.rmtree(run)   # train afresh: a resume would measure less
    results.append(run_stage("train", ["train", "--embeddings", emb, "--out", run, *args.train]))
    results.append(run_stage("evaluate", ["evaluate", "--run", run, "--embeddings", emb, "--overwrite"]))
    t0 = time.time()
    n = write_candidates(emb, cands)
    print(f"  (candidates: {n} rows written in {time.time() - t0:.0f} s)")
    results.append(run_stage("score", ["score", "--run", run, "--support", emb, "--candidates", cands, "--out",
                                       scores, "--overwrite"]))
    metrics = json.loads((w / "run" / "metrics.json").read_text())
    print(json.dumps({"users": args.users, "dim": args.dim, "stages": results,
                      "unseen_accuracy": metrics["unseen"]["accuracy"],
                      "shared_bt_unseen_accuracy": metrics["baselines"]["shared_bt"]["unseen"]["accuracy"]},
                     indent=2))


if __name__ == "__main__":
    main()
