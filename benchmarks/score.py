"""Scoring throughput: batched vs per-user, share of memory bandwidth, and a 1M-user population end to end.

    .venv/bin/python benchmarks/score.py                  # kernel mode, ~1-2 min on 2 CPUs
    .venv/bin/python benchmarks/score.py --mode e2e       # 1,000,000 users through `mrm score` (~10-20 min on 2 CPUs)
    .venv/bin/python benchmarks/score.py --mode e2e --users 100000 --workdir /tmp/bench-100k
    .venv/bin/python benchmarks/score.py --device cuda    # kernel mode on a GPU

kernel: users per second for adapt + score (16 support pairs and 8 candidates per user
  at d=4096, the run's default inner loop), three ways in one process on the same data:
    batched   mrm_ray.core.personalize.Personalizer: thousands of users per call (what `mrm score` runs)
    per-user  the same Personalizer called once per user (a plain Python loop)
    reference the MRM README's adapt_single_user: deepcopy the head, a fresh Adam, backward
              through the head on the raw embeddings, then infer_on_pairs-style scoring
  and the batched kernel's embedding bytes read per second as a share of this machine's
  memory-copy bandwidth measured in the same run (torch copy_ of a 1 GiB buffer; counted
  the STREAM way, bytes read + bytes written).  The kernel only reads embeddings, so
  its ceiling is the read bandwidth, also reported.
e2e: writes a support population (`mrm synth --kind embedding` generator, ~17 pairs per user)
  and a candidates table (8 per user, plus 2% extra users with no pairs, scored with the
  prior), trains a small run, then times `mrm score` as a subprocess (its own local Ray)
  while sampling the resident memory of its whole process tree (driver, raylet, workers).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrm_ray.core.adapt import InnerConfig  # noqa: E402
from mrm_ray.core.model import ModelConfig, MRMHead, bt_loss  # noqa: E402
from mrm_ray.core.personalize import Personalizer  # noqa: E402


def best_time(fn, reps: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


# --- kernel mode ----------------------------------------------------------------------
def copy_bandwidth(device, gib: float = 1.0, reps: int = 5, sync=lambda: None) -> dict:
    n = int(gib * (1 << 30)) // 4
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    t_copy = best_time(lambda: y.copy_(x), reps, sync)
    t_read = best_time(lambda: x.sum(), reps, sync)
    return {"copy_GBps": 2 * n * 4 / t_copy / 1e9, "read_GBps": n * 4 / t_read / 1e9}


class ReferenceMRM(torch.nn.Module):
    """The reference's MRM module as its README uses it: r(e) = softmax(shared_weight) . (W (s e))."""

    def __init__(self, head: MRMHead):
        super().__init__()
        self.register_buffer("w", head.weight().detach().clone())
        self.shared_weight = torch.nn.Parameter(head.theta0.detach().clone())

    def forward(self, e):
        return (e @ self.w.T) @ torch.softmax(self.shared_weight, 0)


def reference_user(base: ReferenceMRM, ch, rj, cand, lr: float, steps: int):
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam([model.shared_weight], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        bt_loss(model(ch) - model(rj)).mean().backward()
        opt.step()
    with torch.no_grad():
        return model.eval()(cand)


def kernel(dim: int, users: int, loop_users: int, support: int, candidates: int, reps: int, device, sync) -> dict:
    torch.manual_seed(0)
    head = MRMHead(dim, ModelConfig(n_heads=2, input_scale=0.01, init_std=0.1))
    inner = InnerConfig(steps=1, lr=5.0, optimizer="sgd")       # the default preset's inner loop
    scorer = Personalizer(head.weight().detach().to(device), head.theta0.detach().to(device), inner)
    ch = torch.randn(users * support, dim, device=device)
    rj = torch.randn(users * support, dim, device=device)
    cand = torch.randn(users * candidates, dim, device=device)
    seg = torch.arange(users, device=device).repeat_interleave(support)
    cseg = torch.arange(users, device=device).repeat_interleave(candidates)

    def batched():
        dphi = scorer.project(ch) - scorer.project(rj)
        theta, _ = scorer.adapt(dphi, seg, users)
        return scorer.rewards(theta, scorer.project(cand), cseg)

    zeros = torch.zeros(support, dtype=torch.long, device=device)

    def per_user():
        for u in range(loop_users):
            c, r = ch[u * support:(u + 1) * support], rj[u * support:(u + 1) * support]
            theta, _ = scorer.adapt(scorer.project(c) - scorer.project(r), zeros, 1)
            cand[u * candidates:(u + 1) * candidates] @ scorer.user_vector(theta[0])

    base = ReferenceMRM(head).to(device)

    def reference():
        for u in range(loop_users):
            s = slice(u * support, (u + 1) * support)
            reference_user(base, ch[s], rj[s], cand[u * candidates:(u + 1) * candidates], inner.lr, inner.steps)

    t_b = best_time(batched, reps, sync)
    t_l = best_time(per_user, 1, sync)
    t_r = best_time(reference, 1, sync)
    # check: the batched rewards equal the per-user ones on the first users
    r_b = batched()[: 4 * candidates]
    r_l = []
    for u in range(4):
        theta, _ = scorer.adapt(scorer.project(ch[u * support:(u + 1) * support]) -
                                scorer.project(rj[u * support:(u + 1) * support]), zeros, 1)
        r_l.append(cand[u * candidates:(u + 1) * candidates] @ scorer.user_vector(theta[0]))
    torch.testing.assert_close(r_b, torch.cat(r_l), rtol=1e-3, atol=1e-4)
    bytes_per_user = (2 * support + candidates) * dim * 4
    return {"dim": dim, "users_batched": users, "users_loop": loop_users,
            "batched_users_per_s": users / t_b, "per_user_users_per_s": loop_users / t_l,
            "reference_users_per_s": loop_users / t_r,
            "speedup_vs_per_user": (users / t_b) / (loop_users / t_l),
            "speedup_vs_reference": (users / t_b) / (loop_users / t_r),
            "batched_read_GBps": users * bytes_per_user / t_b / 1e9}


def kernel_mode(args) -> None:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    all_cores = {}
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        all_cores = copy_bandwidth(device, sync=sync)
        print(f"all {torch.get_num_threads()} cores: memory copy {all_cores['copy_GBps']:.1f} GB/s (read + write), "
              f"read {all_cores['read_GBps']:.1f} GB/s")
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth(device, sync=sync)
    print(f"device {device} ({torch.get_num_threads()} thread(s), as one `mrm score` task): memory copy "
          f"{bw['copy_GBps']:.1f} GB/s (read + write), read {bw['read_GBps']:.1f} GB/s")
    rows = []
    for dim in args.dims:
        r = kernel(dim, args.users if dim >= 1024 else args.users * 8, args.loop_users, args.support,
                   args.candidates, args.reps, device, sync)
        r.update({"pct_of_copy_bw": 100 * r["batched_read_GBps"] / bw["copy_GBps"],
                  "pct_of_read_bw": 100 * r["batched_read_GBps"] / bw["read_GBps"]})
        if all_cores:
            r["pct_of_all_core_copy_bw"] = 100 * r["batched_read_GBps"] / all_cores["copy_GBps"]
        rows.append(r)
        print(f"d={dim:5d}  batched {r['batched_users_per_s']:10,.0f} users/s   per-user loop "
              f"{r['per_user_users_per_s']:8,.0f} users/s ({r['speedup_vs_per_user']:6.1f}x)   reference loop "
              f"{r['reference_users_per_s']:8,.0f} users/s ({r['speedup_vs_reference']:6.1f}x)   "
              f"embeddings read {r['batched_read_GBps']:.2f} GB/s = {r['pct_of_copy_bw']:.0f}% of copy, "
              f"{r['pct_of_read_bw']:.0f}% of read bandwidth")
    print(json.dumps({"bandwidth": bw, "bandwidth_all_cores": all_cores, "threads": torch.get_num_threads(),
                      "kernel": rows, "support_pairs": args.support,
                      "candidates": args.candidates}, indent=1))


# --- e2e mode ---------------------------------------------------------------------------
def write_candidates(out: str, users: int, extra: int, per_user: int, dim: int, seed: int, chunk: int = 100_000):
    """Candidates for u00000000.. (the synth users) and `extra` users n00000000.. with no pairs."""
    import pyarrow as pa

    from mrm_ray.data import contract as C
    from mrm_ray.data import storage

    rng = np.random.default_rng(seed)
    with storage.atomic_output(out) as staging:
        writer = storage.PartWriter(staging, C.candidates_schema(dim))
        for prefix, n in (("u", users), ("n", extra)):
            for lo in range(0, n, chunk):
                ids = np.char.add(prefix, np.char.zfill(np.arange(lo, min(n, lo + chunk)).astype(str), 8))
                uid = np.repeat(ids, per_user)
                cid = np.char.add(np.char.add(uid, "/c"), np.tile(np.arange(per_user).astype(str), len(ids)))
                emb = rng.standard_normal((len(uid), dim), dtype=np.float32)
                writer.write(pa.table({C.USER_ID: pa.array(uid), C.CANDIDATE_ID: pa.array(cid),
                                       C.EMB: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)},
                                      schema=C.candidates_schema(dim)))
        writer.close()


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum of RSS over a process and all its descendants, largest single RSS), bytes; from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss, todo = [], [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    return sum(rss), max(rss, default=0)


def mrm(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "mrm_ray.cli", *argv], check=True, **kw)


def e2e_mode(args) -> None:
    from mrm_ray import synth
    from mrm_ray.data import storage

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    support, cands = work / f"support-{args.users}-d{args.e2e_dim}", work / f"cands-{args.users}-d{args.e2e_dim}"
    run, out = work / f"run-d{args.e2e_dim}", work / "scored"
    t0 = time.time()
    if not storage.exists(str(support / "_SUCCESS")):
        synth.write_embedding_population(str(support), users=args.users, pairs_per_user=args.pairs_per_user,
                                         dim=args.e2e_dim, seed=0, chunk_users=50_000)
    if not storage.exists(str(cands / "_SUCCESS")):
        write_candidates(str(cands), args.users, args.users // 50, args.candidates, args.e2e_dim, seed=1)
    if not storage.exists(str(run / "model.safetensors")):
        small = work / f"train-d{args.e2e_dim}"
        synth.write_embedding_population(str(small), users=2000, pairs_per_user=20, dim=args.e2e_dim, seed=2)
        mrm("train", "--embeddings", str(small), "--out", str(run), "--local", "epochs=3",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"inputs ready in {time.time() - t0:.0f}s: {support} ({du(support)}), {cands} ({du(cands)})", flush=True)

    peak = {"tree": 0, "proc": 0}
    stop = threading.Event()
    cmd = [sys.executable, "-m", "mrm_ray.cli", "score", "--run", str(run), "--support", str(support),
           "--candidates", str(cands), "--out", str(out)]
    print("$ mrm " + " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})

    def sample():
        while not stop.wait(0.5):
            tree, one = tree_rss(proc.pid)
            peak["tree"], peak["proc"] = max(peak["tree"], tree), max(peak["proc"], one)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if code:
        sys.exit(f"mrm score failed with exit status {code}")
    summary = json.loads((out / "summary.json").read_text())
    report = {"users": summary["users"], "prior_users": summary["prior_users"],
              "support_pairs": summary["support_pairs"], "candidates_scored": summary["candidates_scored"],
              "dim": args.e2e_dim, "wall_s": round(wall, 1), "pipeline_s": summary["seconds"],
              "users_per_s_wall": round(summary["users"] / wall), "peak_rss_tree_GiB": round(peak["tree"] / 2**30, 2),
              "peak_rss_one_process_GiB": round(peak["proc"] / 2**30, 2), "partitions": summary["partitions"]}
    print(json.dumps(report, indent=1))


def du(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("kernel", "e2e", "all"), default="kernel")
    p.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 64],
                   help="kernel: embedding dimensions (comma separated)")
    p.add_argument("--users", type=int, default=None,
                   help="kernel: users per batched call at d>=1024 (x8 below; default 1024); e2e: population (default 1M)")
    p.add_argument("--loop-users", type=int, default=200, help="kernel: users timed in the per-user loops")
    p.add_argument("--support", type=int, default=16, help="support pairs per user")
    p.add_argument("--candidates", type=int, default=8, help="candidates per user")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU torch threads for the kernels (1: as each `mrm score` task, one per core)")
    p.add_argument("--workdir", default="/tmp/mrm-bench-score", help="e2e: where the population is written")
    p.add_argument("--e2e-dim", type=int, default=16)
    p.add_argument("--pairs-per-user", type=int, default=16, help="e2e: mean support pairs per user")
    args = p.parse_args()
    if args.mode in ("kernel", "all"):
        kernel_args = argparse.Namespace(**{**vars(args), "users": args.users or 1024})
        kernel_mode(kernel_args)
    if args.mode in ("e2e", "all"):
        e2e_mode(argparse.Namespace(**{**vars(args), "users": args.users or 1_000_000}))


if __name__ == "__main__":
    main()
