"""Fine-tuning the backbone for personalization: the objective, in plain torch.

A frozen embedding caps what any linear head can learn: if the response attributes that users
disagree on are not linear directions of the embedding, no base reward finds them.  `mrm finetune`
trains the backbone's top transformer blocks so that they are.

Two objectives train the backbone's pooled embedding f(x) through a head over K shared directions P
(`objective`; README, "Fine-tuning the backbone", has what each measured):

  factors  each seen user u gets a free weight vector w_u (UserFactors),
               r_u(x) = w_u . P f(x),   loss = mean over u's train pairs of -log sigmoid(r_u(chosen) - r_u(rejected)),
           a low-rank per-user Bradley-Terry model trained jointly with the backbone.
  meta     MRM's own meta-objective (MetaHead): w_u starts at a learned w0 and takes a few gradient
           steps on half of u's pairs (support); the loss is taken on the other half (query), so the
           backbone is rewarded for features on which a few pairs adapt a user, not for memorising pairs.

The head is thrown away afterwards: only the backbone is kept, and MRM is then trained on its new
embedding like on any other (embed -> train -> evaluate), so unseen users never touch fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrm_ray.core.config import TrainConfig


@dataclass
class FinetuneConfig:
    # the seen/unseen split and the validation carve: the same keys and defaults as `mrm train`, so a
    # run trained on the fine-tuned embedding validates on pairs that fine-tuning never saw
    seed: int = TrainConfig.seed
    seen_ratio: float = TrainConfig.seen_ratio
    min_train_pairs: int = TrainConfig.min_train_pairs
    val_ratio: float = TrainConfig.val_ratio
    draw: int = 0                  # which draw of fine-tuning's randomness, on the same split and carve: the head's
                                   # start, each epoch's support halves and step batches, the dropout masks (one run
                                   # is one draw: README); 0 draws what the seed alone drew before it existed
    epochs: int = 6                # the best epoch on the validation carve is kept (README: 6 against 4 and 8)
    batch_pairs: int = 32          # pairs per optimizer step, all workers together
    lr: float = 1e-4               # the backbone's trained blocks
    head_lr: float = 1e-2          # P and the per-user weights
    rank: int = 8                  # K, the number of shared directions
    shared: bool = False           # objective=factors: add weights common to all users to each user's own;
                                   # objective=meta: also fit the start w0 as the population's reward (its
                                   # Bradley-Terry loss on the query pairs, added to theirs after adaptation;
                                   # train_loss is then the sum of both, validation the adapted users' alone)
    objective: str = "meta"        # "meta": MRM's meta-objective, the head adapted per user on support pairs and
                                   # scored on query pairs (MetaHead); "factors": a free weight vector per seen
                                   # user (UserFactors).  Chosen on three text populations (README)
    inner_steps: int = 3           # objective=meta: gradient steps of a user's adaptation
    inner_lr: float = 1.0          # objective=meta: their starting step size (learned with the head)
    top_layers: int = 2            # transformer blocks trained, counted from the top; 0 = all (full fine-tuning)
    dropout: bool = True           # the backbone's own dropout while training (measured: it is what makes fine-tuning
                                   # help unseen users); off, 1 and N workers take exactly the same steps
    max_length: int = 512          # tokens per text (longer ones keep their end, as in `mrm embed`)
    zero_stage: int = 2            # DeepSpeed ZeRO stage (0-3); 3 shards the parameters too (8B backbones)
    offload: str = "none"          # "cpu": ZeRO-Offload, optimizer states (and at stage 3 the parameters) in host
                                   # memory; needs DeepSpeed's cpu_adam op (built in, or a compiler to build it)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 1
    buckets: int = 16              # the fine-tuning data's bucket files (bucket b goes to worker b % world)


def check(cfg: FinetuneConfig) -> list[str]:
    """What is wrong with a config (empty when nothing)."""
    rules = [(cfg.epochs >= 1, "epochs must be >= 1"), (cfg.batch_pairs >= 1, "batch_pairs must be >= 1"),
             (cfg.lr > 0 and cfg.head_lr > 0, "lr and head_lr must be > 0"), (cfg.rank >= 1, "rank must be >= 1"),
             (cfg.top_layers >= 0, "top_layers must be >= 0 (0 = all)"),
             (cfg.objective in ("factors", "meta"), "objective must be factors or meta"),
             (cfg.inner_steps >= 1 and cfg.inner_lr > 0, "inner_steps must be >= 1 and inner_lr > 0"),
             (cfg.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
             (cfg.offload in ("none", "cpu"), "offload must be none or cpu"),
             (cfg.offload == "none" or cfg.zero_stage >= 1, "offload=cpu needs zero_stage 1, 2 or 3"),
             (0 < cfg.seen_ratio < 1, "seen_ratio must be in (0, 1)"), (0 <= cfg.val_ratio < 1, "val_ratio must be in [0, 1)"),
             (cfg.num_workers >= 1, "num_workers must be >= 1"), (cfg.max_length >= 8, "max_length must be >= 8"),
             (cfg.buckets >= 1, "buckets must be >= 1"), (cfg.draw >= 0, "draw must be >= 0")]
    return [msg for ok, msg in rules if not ok]


def draw_seed(cfg: FinetuneConfig) -> int:
    """The seed of fine-tuning's random draws; `seed` alone decides the split and the carve, so that another
    draw fine-tunes on exactly the data of the first, and `mrm train` (whose seed is `seed`) agrees on both."""
    return cfg.seed + 10_007 * cfg.draw


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the model's largest ModuleList (BERT's encoder.layer, Llama's layers)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to fine-tune")
    return max(lists, key=len)


def select_trainable(model: nn.Module, top_layers: int) -> int:
    """Freeze all but the top `top_layers` blocks (0: train everything); returns the trainable parameter count."""
    model.requires_grad_(top_layers == 0)
    if top_layers:
        for block in list(blocks(model))[-top_layers:]:
            block.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class UserFactors(nn.Module):
    """r_u(x) = w_u . P f(x): K shared directions and a weight vector per seen user (a seeded start).

    With `shared`, r_u(x) = (s + w_u) . P f(x): the population's common weights s learn from every
    user's pairs, where a user's own w_u sees only the few pairs of that user."""

    def __init__(self, dim: int, n_users: int, rank: int, seed: int = 0, shared: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(rank, dim, generator=g) / dim ** 0.5)
        self.users = nn.Parameter(0.1 * torch.randn(n_users, rank, generator=g))
        self.shared = nn.Parameter(0.1 * torch.randn(rank, generator=g)) if shared else None

    def margins(self, chosen: torch.Tensor, rejected: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        w = self.users[user] if self.shared is None else self.users[user] + self.shared
        return ((chosen - rejected).float() @ self.proj.T * w).sum(-1)


class MetaHead(nn.Module):
    """r_u(x) = w_u . P f(x), where w_u starts at a shared w0 and takes `steps` gradient steps of the mean
    Bradley-Terry loss on u's SUPPORT pairs; the loss that trains the backbone, P, w0 and the step size is
    taken on u's QUERY pairs.  This is MRM's meta-objective (MAML) with the head's inner loop written out:
    the gradient of -log sigmoid(w . d) in w is -sigmoid(-w . d) d, so no second-order autograd is
    needed, and every user of a batch adapts at once (index_add by user).  Against UserFactors it
    cannot win by memorising pairs, because the pairs it is scored on never moved w_u."""

    def __init__(self, dim: int, rank: int, seed: int = 0, lr: float = 1.0, steps: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(rank, dim, generator=g) / dim ** 0.5)
        self.init = nn.Parameter(0.1 * torch.randn(rank, generator=g))
        self.log_lr = nn.Parameter(torch.tensor([float(lr)]).log())   # 1-d: DeepSpeed broadcasts no 0-d tensor
        self.steps = steps

    def adapted(self, d: torch.Tensor, user: torch.Tensor, support: torch.Tensor, n_users: int) -> torch.Tensor:
        """[n_users, K] weights adapted on the support rows; d [n, K] = P (f(chosen) - f(rejected)),
        user [n] in 0..n_users-1.  A user without support pairs keeps w0."""
        s = support.to(d.dtype)
        count = torch.zeros(n_users, dtype=d.dtype, device=d.device).index_add(0, user, s).clamp(min=1)[:, None]
        w = self.init.expand(n_users, -1)
        for _ in range(self.steps):
            m = (w[user] * d).sum(-1)
            grad = torch.zeros_like(w).index_add(0, user, (-torch.sigmoid(-m) * s)[:, None] * d) / count
            w = w - self.log_lr.exp() * grad
        return w

    def project(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """d = P (f(chosen) - f(rejected)), [n, K]."""
        return (chosen - rejected).float() @ self.proj.T

    def start_margins(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """Every pair's margin under the shared start w0, before any adaptation."""
        return self.project(chosen, rejected) @ self.init

    def margins(self, chosen: torch.Tensor, rejected: torch.Tensor, user: torch.Tensor,
                support: torch.Tensor) -> torch.Tensor:
        """Every pair's margin under its user's adapted weights (user: any ids; support: bool per pair)."""
        d = self.project(chosen, rejected)
        local, index = torch.unique(user, return_inverse=True)
        return (self.adapted(d, index, support, len(local))[index] * d).sum(-1)


def pair_losses(margins: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of each pair, -log sigmoid(margin)."""
    return F.softplus(-margins)
