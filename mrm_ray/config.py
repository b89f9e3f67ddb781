"""Typed training configuration: presets, YAML files, key=value overrides.

    cfg = load_config(preset="default", path="exp.yaml", overrides=["inner.lr=0.5"])

Sections mirror the algorithm: `model` (the reward head), `inner` (per-user
adaptation), `rpo` (robust objective) and the top-level meta-training keys.
Unknown keys and impossible values are errors at parse time, with one line
that names the key.

Presets:
  default  tuned on synthetic populations to work out of the box (SGD inner
           steps, bigger meta-batches, fewer epochs)
  prism    the reference's PRISM script: fresh Adam inner step lr 1e-3, meta
           lr 1e-3, meta-batch 2, 200 epochs, RPO alpha 0.5 gamma 0.5
  reddit   the reference's Reddit TL;DR script: as prism with lr 5e-3 and
           100 train pairs per seen user
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

import yaml

from mrm_ray.adapt import InnerConfig
from mrm_ray.errors import UserError
from mrm_ray.model import ModelConfig
from mrm_ray.rpo import RPOConfig


class ConfigError(UserError):
    pass


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
    epochs: int = 20
    tasks_per_batch: int = 16            # users per global meta-batch (on average; see tasks.epoch_slots)
    meta_lr: float = 0.1
    warmup_ratio: float = 0.05           # linear warm-up share of all steps, then cosine decay to 0
    grad_clip: float = 1.0               # max global grad norm (<= 0: off)
    eval_every: int = 1                  # epochs between validation passes (and checkpoints)
    eval_inner_steps: int | None = None  # inner steps at evaluation (None: as in training)
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2                # worker failures tolerated (restart from the last checkpoint)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    rpo: RPOConfig = field(default_factory=RPOConfig)

    @property
    def eval_steps(self) -> int:
        return self.inner.steps if self.eval_inner_steps is None else self.eval_inner_steps


# The default was tuned on `mrm synth` populations (see README "Choosing a config"):
# SGD inner steps of size 5 on margins made O(1) by the auto input scale, a
# 50/50 support/query split, and RPO without the gradient through the quantile.
_DEFAULT = {"model": {"auto_input_scale": True, "init_std": 0.1},
            "inner": {"optimizer": "sgd", "lr": 5.0, "steps": 1},
            "rpo": {"enabled": True, "alpha": 0.5, "gamma": 0.5, "detach": "tau"}}
_REFERENCE = {"epochs": 200, "tasks_per_batch": 2, "query_ratio": 0.9, "val_ratio": 0.2,
              "model": {"auto_input_scale": False, "input_scale": 0.01, "n_heads": 2},
              "rpo": {"enabled": True, "alpha": 0.5, "gamma": 0.5, "detach": "none"},
              "warmup_ratio": 0.05, "grad_clip": 1.0}
PRESETS: dict[str, dict] = {
    "default": _DEFAULT,
    "prism": {**_REFERENCE, "meta_lr": 1e-3, "inner": {"optimizer": "adam", "lr": 1e-3, "steps": 1}},
    "reddit": {**_REFERENCE, "meta_lr": 5e-3, "seen_train_limit": 100, "unseen_train_limit": 100,
               "inner": {"optimizer": "adam", "lr": 5e-3, "steps": 1}},
}


def _check(cfg: TrainConfig) -> None:
    rules = [
        (cfg.meta_lr > 0, "meta_lr must be > 0"),
        (cfg.inner.lr > 0, "inner.lr must be > 0"),
        (cfg.inner.steps >= 1, "inner.steps must be >= 1"),
        (cfg.inner.optimizer in ("sgd", "adam"), "inner.optimizer must be 'sgd' or 'adam'"),
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
        (cfg.eval_every >= 1, "eval_every must be >= 1"),
        (cfg.model.n_heads >= 1, "model.n_heads must be >= 1"),
        (cfg.model.input_scale > 0, "model.input_scale must be > 0"),
        (all(h >= 1 for h in cfg.model.hidden_sizes), "model.hidden_sizes must be positive"),
        (cfg.seen_train_limit is None or cfg.seen_train_limit >= 1, "seen_train_limit must be >= 1"),
        (cfg.unseen_train_limit is None or cfg.unseen_train_limit >= 1, "unseen_train_limit must be >= 1"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(f"invalid config: {msg}")


def _coerce(value, current, key: str):
    """Convert a YAML/CLI value to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"invalid config: {key} must be true or false, got {value!r}")
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if current is None or value is None:
        return value
    try:
        if isinstance(current, (list, tuple)):
            value = value if isinstance(value, (list, tuple)) else [value]
            return type(current)(type(current[0])(v) if current else int(v) for v in value)
        if isinstance(current, float) and isinstance(value, (int, float)):
            return float(value)
        if isinstance(current, int) and isinstance(value, int):
            return value
        if isinstance(current, str) and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"invalid config: {key} expects {type(current).__name__}, got {value!r}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; known: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"invalid config: {full} is a section, give {full}.KEY=VALUE")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, current, full))


def parse_overrides(items: list[str]) -> dict:
    """['inner.lr=0.5', 'epochs=3'] -> {'inner': {'lr': '0.5'}, 'epochs': '3'}"""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(preset: str = "default", path: str | None = None, overrides: list[str] | dict | None = None,
                text: str | None = None) -> TrainConfig:
    """Preset, then a YAML file (or its text), then key=value overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = TrainConfig()
    _apply(cfg, copy.deepcopy(PRESETS[preset]))
    if path is not None:
        from mrm_ray import storage
        text = storage.read_bytes(path).decode()
    if text is not None:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError("config file must be a mapping of keys to values")
        data.pop("preset", None)
        _apply(cfg, data)
    if overrides:
        _apply(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    _check(cfg)
    return cfg


def config_preset(path_or_text: str | None) -> str:
    """The `preset:` key of a YAML config, if any (default: 'default')."""
    if not path_or_text:
        return "default"
    data = yaml.safe_load(path_or_text) or {}
    return data.get("preset", "default") if isinstance(data, dict) else "default"


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a saved config (run directory's config.json)."""
    cfg = TrainConfig()
    _apply(cfg, json.loads(json.dumps(data)))
    _check(cfg)
    return cfg
