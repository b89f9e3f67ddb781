"""Users adapted per second: batched `adapt` vs. the per-user loop, same inputs, one run.

    python benchmarks/adapt.py                       # d=4096, 16 support pairs/user, 1 inner step
    python benchmarks/adapt.py --users 4096 --optimizer sgd

The per-user loop is the reference's way of adapting a user: copy the model,
a fresh torch.optim.Adam on the user weights, forward chosen and rejected
through the base heads, backward, step; one user at a time.  The batched path
is what evaluation and scoring run: one (rows, d) x (d, K) product for all
users' pairs, then `mrm_ray.core.adapt.adapt` on K floats per pair, users
flattened with segment ops.  Both produce the same adapted weights (checked
here, and in tests/test_adapt.py).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from mrm_ray.core.adapt import InnerConfig, adapt
from mrm_ray.core.meta import single_thread
from mrm_ray.core.model import ModelConfig, MRMHead


def per_user_loop(head: MRMHead, ch: torch.Tensor, rj: torch.Tensor, cfg: InnerConfig) -> torch.Tensor:
    out = []
    for u in range(ch.shape[0]):
        user = copy.deepcopy(head)                      # the reference deep-copies the model per user
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
        opt = opt_cls([user.theta0], lr=cfg.lr)
        for _ in range(cfg.steps):
            opt.zero_grad()
            w = user.weight().detach()
            r_c = (F.softmax(user.theta0, -1) * (ch[u] @ w.T)).sum(-1)
            r_r = (F.softmax(user.theta0, -1) * (rj[u] @ w.T)).sum(-1)
            loss = -F.logsigmoid(r_c - r_r).mean()
            loss.backward()
            opt.step()
        out.append(user.theta0.detach().clone())
    return torch.stack(out)


def batched(head: MRMHead, ch: torch.Tensor, rj: torch.Tensor, cfg: InnerConfig) -> torch.Tensor:
    u, p, d = ch.shape
    with torch.no_grad():
        w = head.weight()
        # (ch - rj) @ W^T as two products: no (rows, d) temporary, embeddings read once
        dphi = ch.reshape(-1, d) @ w.T - rj.reshape(-1, d) @ w.T
        seg = torch.arange(u).repeat_interleave(p)
        with single_thread():
            return adapt(head.theta0, dphi, seg, u, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4096, help="users in the batched run")
    ap.add_argument("--loop-users", type=int, default=300, help="users in the per-user loop (rate extrapolates)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=16, help="support pairs per user")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = InnerConfig(steps=args.steps, lr=1e-3 if args.optimizer == "adam" else 1.0, optimizer=args.optimizer)
    head = MRMHead(args.dim, ModelConfig())
    ch = torch.randn(args.users, args.pairs, args.dim)
    rj = torch.randn(args.users, args.pairs, args.dim)

    n = min(args.loop_users, args.users)
    t0 = time.perf_counter()
    with single_thread():  # the loop's tiny ops are fastest on one thread (see README: Troubleshooting)
        ref = per_user_loop(head, ch[:n], rj[:n], cfg)
    loop_rate = n / (time.perf_counter() - t0)

    batched(head, ch, rj, cfg)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        theta = batched(head, ch, rj, cfg)
        times.append(time.perf_counter() - t0)
    best = min(times)
    rate = args.users / best
    gbps = ch.numel() * 2 * 4 / best / 1e9
    torch.testing.assert_close(theta[:n], ref, atol=1e-5, rtol=1e-4)  # same answer as the loop

    print(f"d={args.dim} pairs/user={args.pairs} inner={args.optimizer} x{args.steps} torch threads={torch.get_num_threads()}")
    print(f"per-user loop : {loop_rate:10.0f} users/s  ({n} users)")
    print(f"batched adapt : {rate:10.0f} users/s  ({args.users} users, best of {args.repeats}; "
          f"reads embeddings at {gbps:.1f} GB/s)")
    print(f"speed-up      : {rate / loop_rate:10.1f}x")
    copy_gbps = memcpy_gbps()
    print(f"memory copy   : {copy_gbps:10.1f} GB/s (read+write of a 1 GiB tensor); "
          f"the batched path reads at {100 * gbps / copy_gbps:.0f}% of it")


def memcpy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


if __name__ == "__main__":
    main()
