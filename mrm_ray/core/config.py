"""The training configuration: typed, with defaults that ARE the defaults of `mrm train`.

Plain dataclasses and their validation (no YAML: mrm_ray.config reads files,
presets and key=value overrides into these).  Each section lives with the
code it configures: ModelConfig (core.model), InnerConfig (core.adapt),
RPOConfig (core.rpo), BasisConfig (core.basis).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mrm_ray.core.adapt import InnerConfig
from mrm_ray.core.basis import BasisConfig
from mrm_ray.core.model import ModelConfig
from mrm_ray.core.rpo import RPOConfig


# Where a run executes, not what it computes (1 or N workers take the same meta-steps):
# a resumed run may change them, e.g. continue on fewer workers or with cpus_per_worker=0.5.
PLACEMENT_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures")


class ConfigError(ValueError):
    """An impossible configuration; mrm_ray.config re-raises it as a one-line user error."""


@dataclass
class TrainConfig:
    seed: int = 0
    # users: which are meta-trained ("seen"); the rest are held out ("unseen")
    seen_ratio: float = 0.5
    min_train_pairs: int = 2             # users with fewer train pairs are skipped (and counted)
    seen_train_limit: int | None = None  # cap on train pairs per seen user (reference Reddit: 100)
    unseen_train_limit: int | None = None
    val_ratio: float = 0.2               # share of a seen user's train conversations kept for model selection
    # meta-training
    query_ratio: float = 0.5             # share of a user's conversations in the query set each epoch
    epochs: int = 10
    tasks_per_batch: int = 32            # users per global meta-batch (on average; see splits.epoch_slots)
    meta_lr: float = 0.01
    warmup_ratio: float = 0.05           # linear warm-up share of all steps, then cosine decay to 0
    grad_clip: float = 1.0               # max global grad norm (<= 0: off)
    eval_every: int = 1                  # epochs between validation passes (and checkpoints)
    eval_inner_steps: int | None = None  # inner steps at evaluation (None: as in training)
    select_metric: str = "loss"          # what picks the epoch on the validation carve: "loss", "accuracy",
                                         # or "last" (the final epoch, as the reference reports)
    # "reddit" / "prism": reproduce the reference code's splits, caps, meta-batches, schedule and
    # initialisation exactly (mrm_ray.core.reference; the prism and reddit presets); "none": ours.
    reference_mode: str = "none"
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2                # worker failures tolerated (restart from the last checkpoint)
    shard_buckets: int = 64              # the seen users' train rows are written in this many buckets of whole
                                         # users (<run>/shards/); worker r reads buckets b % num_workers == r
    shard_dtype: str = "auto"            # embeddings in a worker's memory: float32, bfloat16, float16, or
                                         # auto (bfloat16 from d >= 1024: half the memory)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    rpo: RPOConfig = field(default_factory=RPOConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)   # the data-driven start (model.init = "data")

    @property
    def eval_steps(self) -> int:
        return self.inner.steps if self.eval_inner_steps is None else self.eval_inner_steps


def check(cfg: TrainConfig) -> None:
    """Refuse impossible values, with one line naming the key."""
    rules = [
        (cfg.meta_lr > 0, "meta_lr must be > 0"),
        (cfg.inner.lr > 0, "inner.lr must be > 0"),
        (cfg.inner.steps >= 1, "inner.steps must be >= 1"),
        (cfg.inner.optimizer in ("sgd", "adam", "newton"), "inner.optimizer must be 'sgd', 'adam' or 'newton'"),
        (cfg.model.weights in ("softmax", "linear"), "model.weights must be 'softmax' or 'linear'"),
        (cfg.model.init in ("random", "data", "reference"), "model.init must be 'random', 'data' or 'reference'"),
        (cfg.reference_mode in ("none", "reddit", "prism"), "reference_mode must be 'none', 'reddit' or 'prism'"),
        (cfg.inner.optimizer != "newton" or cfg.model.weights == "linear",
         "inner.optimizer=newton needs model.weights=linear"),
        (cfg.model.init != "data" or not cfg.model.hidden_sizes, "model.init=data needs model.hidden_sizes=[]"),
        (cfg.select_metric in ("accuracy", "loss", "last"), "select_metric must be 'accuracy', 'loss' or 'last'"),
        (cfg.basis.folds >= 2, "basis.folds must be >= 2"),
        (cfg.basis.select in ("loss", "accuracy"), "basis.select must be 'loss' or 'accuracy'"),
        (cfg.basis.max_heads >= 1, "basis.max_heads must be >= 1"),
        (len(cfg.basis.ridge) > 0 and all(r > 0 for r in cfg.basis.ridge), "basis.ridge must be positive values"),
        (len(cfg.basis.prior_scale) > 0 and all(c > 0 for c in cfg.basis.prior_scale),
         "basis.prior_scale must be positive values"),
        (cfg.eval_steps >= 1, "eval_inner_steps must be >= 1"),
        (0 < cfg.rpo.alpha <= 1, "rpo.alpha must be in (0, 1]"),
        (cfg.rpo.detach in ("none", "tau", "weights"), "rpo.detach must be 'none', 'tau' or 'weights'"),
        (cfg.tasks_per_batch >= 1, "tasks_per_batch must be >= 1"),
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (0 < cfg.seen_ratio < 1, "seen_ratio must be in (0, 1)"),
        (0 <= cfg.val_ratio < 1, "val_ratio must be in [0, 1)"),
        (0 <= cfg.query_ratio < 1, "query_ratio must be in [0, 1)"),
        (0 <= cfg.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (cfg.min_train_pairs >= 1, "min_train_pairs must be >= 1"),
        (cfg.num_workers >= 1, "num_workers must be >= 1"),
        (cfg.cpus_per_worker > 0, "cpus_per_worker must be > 0"),
        (cfg.max_failures >= -1, "max_failures must be >= 0, or -1 (retry forever)"),
        (cfg.shard_buckets >= 1, "shard_buckets must be >= 1"),
        (cfg.shard_dtype in ("auto", "float32", "bfloat16", "float16"),
         "shard_dtype must be auto, float32, bfloat16 or float16"),
        (cfg.eval_every >= 1, "eval_every must be >= 1"),
        (cfg.model.n_heads >= 1 or (cfg.model.n_heads == 0 and cfg.model.init == "data"),
         "model.n_heads must be >= 1 (0 = chosen by cross-validation, with model.init=data)"),
        (cfg.model.input_scale > 0, "model.input_scale must be > 0"),
        (all(h >= 1 for h in cfg.model.hidden_sizes), "model.hidden_sizes must be positive"),
        (cfg.seen_train_limit is None or cfg.seen_train_limit >= 1, "seen_train_limit must be >= 1"),
        (cfg.unseen_train_limit is None or cfg.unseen_train_limit >= 1, "unseen_train_limit must be >= 1"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(f"invalid config: {msg}")


