"""Personalized reward models in a few lines of Python (in-process, no Ray).

The reference example -- embed pairs with the backbone, adapt one user on a few of
them, score new pairs -- reads:

    from mrm_ray import api

    rm = api.load("runs/r1")                                    # W and theta_0 of a trained run
    model, tokenizer = api.load_backbone("Skywork/Skywork-Reward-V2-Llama-3.1-8B")
    support_pairs = [{"prompt": [{"role": "user", "content": "Summarize: I switched from iPhone to Android."}],
                      "chosen": "The author values customization and battery life over lock-in.",
                      "rejected": "The author bought a new phone."}]
    test_pairs = [{"prompt": "TL;DR: I quit my job to freelance.",            # a plain string works too
                   "chosen": "Freelancing is flexible but needs discipline.",
                   "rejected": "The author talks about freelancing."}]

    sup_ch, sup_rj = api.encode_pairs(model, tokenizer, support_pairs)  # (n, d) each
    user = rm.adapt(sup_ch, sup_rj)                              # one user, from theta_0
    test_ch, test_rj = api.encode_pairs(model, tokenizer, test_pairs)
    r_ch, r_rj = user.score_pairs(test_ch, test_rj)              # rewards of chosen / rejected
    user.score(test_ch)                                          # reward of any embedded response
    user.vector                                                  # v_u (d,): reward = v_u . e

Many users at once (one batched adaptation: the same numbers as `mrm score`):

    users = rm.adapt_many({"alice": (ch_a, rj_a), "bob": (ch_b, rj_b)})
    users["alice"].score(emb)

Stored users: `rm.user_from_weights("scored/", "alice")` reads the weights table of
`mrm score`; `rm.adapt_from_table("data/emb", "alice")` adapts on that user's rows
of an embeddings table; `rm.prior()` is the population prior theta_0.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage
from mrm_ray.errors import UserError
from mrm_ray.core.personalize import Personalizer, as_float_tensor
from mrm_ray.score import MODEL_SHA, WEIGHTS

log = logging.getLogger(__name__)

__all__ = ["load", "RewardModel", "UserReward", "encode_pairs", "load_backbone"]


def encode_pairs(model, tokenizer, pairs: list[dict], **kwargs):
    """(chosen [n, d], rejected [n, d]) embeddings, as `mrm embed` computes them: mrm_ray.backbone.encode_pairs."""
    from mrm_ray.backbone import encode_pairs as _encode
    return _encode(model, tokenizer, pairs, **kwargs)


def load_backbone(name_or_path: str, device=None, **kwargs):
    """(model, tokenizer) of a frozen backbone: mrm_ray.backbone.load_backbone."""
    from mrm_ray.backbone import load_backbone as _load
    return _load(name_or_path, device=device, **kwargs)


@dataclass(frozen=True)
class UserReward:
    """One user's reward model: r_u(e) = v_u . e, with v_u = s W^T mixing(theta) (softmax or linear; mrm_ray.core.model)."""

    theta: torch.Tensor      # (K,) adapted logits over the K base rewards
    vector: torch.Tensor     # (d,) v_u
    n_support: int = 0       # pairs it was adapted on; 0 = the population prior theta_0

    @property
    def prior(self) -> bool:
        return self.n_support == 0

    def score(self, emb) -> torch.Tensor:
        """Rewards of embedded responses: (n, d) -> (n,), or (d,) -> a scalar tensor."""
        e = as_float_tensor(emb)
        if e.shape[-1] != self.vector.shape[0]:
            raise UserError(f"embeddings have d={e.shape[-1]}, this reward model expects d={self.vector.shape[0]}")
        return e @ self.vector.to(e.device)

    def score_pairs(self, chosen, rejected) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward(chosen), reward(rejected)) for (n, d) pair embeddings."""
        return self.score(chosen), self.score(rejected)

    def accuracy(self, chosen, rejected) -> float:
        """Share of pairs with reward(chosen) > reward(rejected) (ties count as wrong)."""
        r_ch, r_rj = self.score_pairs(chosen, rejected)
        return float((r_ch > r_rj).float().mean()) if len(r_ch) else float("nan")


class RewardModel:
    """A trained run: the shared base rewards W and the meta-learned start theta_0."""

    def __init__(self, run: runs.Run, steps: int | None = None):
        self.run = run
        self.personalizer = Personalizer.from_run(run, steps)

    @property
    def dim(self) -> int:
        return self.personalizer.dim

    @property
    def theta0(self) -> torch.Tensor:
        return self.personalizer.theta0

    def user(self, theta, n_support: int = 0) -> UserReward:
        theta = as_float_tensor(theta).reshape(-1).clone()
        if theta.shape[0] != self.theta0.shape[0]:
            raise UserError(f"theta has {theta.shape[0]} entries; this run has {self.theta0.shape[0]} base rewards")
        return UserReward(theta, self.personalizer.user_vector(theta), int(n_support))

    def prior(self) -> UserReward:
        """The population prior: what a user with no pairs gets."""
        return self.user(self.theta0)

    def _matrix(self, x, what: str) -> torch.Tensor:
        m = as_float_tensor(x)
        m = m.unsqueeze(0) if m.dim() == 1 else m
        if m.dim() != 2 or (m.shape[0] and m.shape[1] != self.dim):
            raise UserError(f"{what} embeddings have shape {tuple(m.shape)}; this run expects (n, {self.dim})")
        return m

    def _dphi(self, chosen, rejected) -> torch.Tensor:
        ch, rj = self._matrix(chosen, "chosen"), self._matrix(rejected, "rejected")
        if ch.shape != rj.shape:
            raise UserError(f"chosen {tuple(ch.shape)} and rejected {tuple(rj.shape)} embeddings differ in shape")
        if not (torch.isfinite(ch).all() and torch.isfinite(rj).all()):
            raise UserError("pair embeddings contain NaN or inf")
        return self.personalizer.project(ch) - self.personalizer.project(rj)

    def _personalizer(self, steps: int | None) -> Personalizer:
        return self.personalizer if steps is None else replace(self.personalizer, inner=replace(self.personalizer.inner, steps=steps))

    def adapt(self, chosen, rejected, steps: int | None = None) -> UserReward:
        """One user adapted from theta_0 on its (n, d) chosen / rejected embeddings (the run's eval steps)."""
        dphi = self._dphi(chosen, rejected)
        theta, n = self._personalizer(steps).adapt(dphi, torch.zeros(len(dphi), dtype=torch.long), 1)
        return self.user(theta[0], int(n[0]))

    def adapt_many(self, users: Mapping | Sequence, steps: int | None = None):
        """Many users in ONE batched adaptation.

        users: {user_id: (chosen, rejected)} -> {user_id: UserReward}, or a list of
        (chosen, rejected) -> a list.
        """
        keys = list(users.keys()) if isinstance(users, Mapping) else None
        items = list(users.values()) if keys is not None else list(users)
        dphi = [self._dphi(ch, rj) for ch, rj in items]
        seg = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(x) for x in dphi], dtype=torch.long))
        k = self.theta0.shape[0]
        theta, n = self._personalizer(steps).adapt(torch.cat(dphi) if dphi else torch.zeros(0, k), seg, len(items))
        out = [self.user(theta[i], int(n[i])) for i in range(len(items))]
        return dict(zip(keys, out)) if keys is not None else out

    # --- stored users ----------------------------------------------------------------
    def user_from_weights(self, uri: str, user_id: str) -> UserReward | None:
        """A user's weights from `mrm score`'s output (or its weights/ table, or `mrm evaluate`'s
        per_user table); None when the user is not in it."""
        table_uri = storage.join(uri, WEIGHTS) if storage.is_dir(storage.join(uri, WEIGHTS)) else uri
        schema = storage.schema(table_uri)
        C.require_columns(schema, (C.USER_ID, C.THETA), "weights")
        made_by = (schema.metadata or {}).get(MODEL_SHA)
        if made_by is not None and made_by.decode() != self.run.model_sha256:
            raise UserError(f"weights table {table_uri} was produced with a different run's model than {self.run.uri}")
        cols = [c for c in (C.USER_ID, C.THETA, C.N_SUPPORT, "train_pairs") if c in schema.names]
        rows = storage.read_table(table_uri, columns=cols, filter=pc.field(C.USER_ID) == str(user_id))
        if rows.num_rows == 0:
            return None
        theta = C.emb_matrix(rows.column(C.THETA), "weights", C.THETA)[0]
        n_col = C.N_SUPPORT if C.N_SUPPORT in cols else "train_pairs" if "train_pairs" in cols else None
        n = int(rows.column(n_col)[0].as_py()) if n_col else 1
        return self.user(theta, n)

    def adapt_from_table(self, uri: str, user_id: str, split: str = "all", steps: int | None = None) -> UserReward:
        """Adapt a user on its rows of an embeddings table (split: all or train); the prior when it has none."""
        schema = storage.schema(uri)
        C.require_columns(schema, (C.USER_ID, C.CHOSEN_EMB, C.REJECTED_EMB), "support (embeddings)")
        where = pc.field(C.USER_ID) == str(user_id)
        if split == "train" and C.SPLIT in schema.names:
            where = where & ((pc.field(C.SPLIT) != C.TEST) | pc.field(C.SPLIT).is_null())  # null split = train
        rows = storage.read_table(uri, columns=[C.USER_ID, C.CHOSEN_EMB, C.REJECTED_EMB], filter=where)
        if rows.num_rows == 0:
            return self.prior()
        ch = C.emb_matrix(rows.column(C.CHOSEN_EMB), "support (embeddings)", C.CHOSEN_EMB)
        rj = C.emb_matrix(rows.column(C.REJECTED_EMB), "support (embeddings)", C.REJECTED_EMB)
        return self.adapt(ch, rj, steps)


def load(run_uri: str, steps: int | None = None) -> RewardModel:
    """Load a trained run (local path or s3://); `steps` overrides its eval_inner_steps."""
    return RewardModel(runs.load_run(run_uri), steps)


def weights_table(users: Mapping[str, UserReward]) -> pa.Table:
    """{user_id: UserReward} as a weights table (user_id, theta, n_support, prior), e.g. to store."""
    ids = list(users)
    if not ids:
        raise UserError("weights_table needs at least one user")
    theta = torch.stack([users[u].theta for u in ids]).numpy().astype(np.float32)
    k = theta.shape[1]
    return pa.table({C.USER_ID: pa.array(ids, pa.string()),
                     C.THETA: pa.FixedSizeListArray.from_arrays(pa.array(theta.reshape(-1)), k),
                     C.N_SUPPORT: pa.array([users[u].n_support for u in ids], pa.int64()),
                     C.PRIOR: pa.array([users[u].prior for u in ids], pa.bool_())})
