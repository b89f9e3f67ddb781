"""The run directory: what `mrm train` leaves and every later stage reads (its names, in one place).

    <run>/config.json          the resolved TrainConfig
    <run>/model.json           format version, embedding dim, model config, best epoch, the table's provenance
    <run>/model.safetensors    the selected (best validation) head: W layers, theta0[, log_inner_lr, log_prior]
    <run>/users.parquet        user_id, seen, train_pairs, test_pairs, skipped, reference_index
    <run>/scan.json            dim, pairs, RMS norm of chosen - rejected (the one pass over the table)
    <run>/shards/              the seen users' train rows in buckets of whole users (mrm_ray.data.shards)
    <run>/history.json         per-epoch meta-loss, RPO weight spread, validation accuracy and loss
    <run>/start.json           the data-driven start: chosen K, ridge, prior and the cross-validation table
    <run>/inputs.json          the embeddings table it trains on, and its fingerprint (a resume must match)
    <run>/_lock                held by the `mrm train` that owns the directory (mrm_ray.data.lease)
    <run>/checkpoints/train/   Ray Train checkpoints; checkpoints/local/: the local trainer's
    <run>/metrics.json         written by `mrm evaluate` (with per_user.parquet and plots beside it)

Weights are safetensors (no pickle); training state is torch.save'd plain
tensors and numbers, loaded with weights_only=True.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mrm_ray import config as config_mod
from mrm_ray.data import storage
from mrm_ray.errors import UserError
from mrm_ray.core.model import MRMHead

FORMAT_VERSION = 1
CONFIG, MODEL_JSON, MODEL, USERS, HISTORY, METRICS, START, INPUTS, SCAN, SHARDS, LOCK = (
    "config.json", "model.json", "model.safetensors", "users.parquet", "history.json", "metrics.json", "start.json",
    "inputs.json", "scan.json", "shards", "_lock")
CHECKPOINTS, LOCAL_CHECKPOINTS = "checkpoints", "checkpoints/local"
PER_USER = "per_user.parquet"   # mrm evaluate's per-user table, beside its metrics file


@dataclass
class Run:
    uri: str
    cfg: config_mod.TrainConfig
    head: MRMHead
    info: dict
    model_sha256: str = ""   # of model.safetensors: ties a weights table to the run that produced it

    @property
    def dim(self) -> int:
        return self.head.dim

    def users(self) -> pa.Table:
        return storage.read_table(storage.join(self.uri, USERS))


def build_head(dim: int, cfg: config_mod.TrainConfig) -> MRMHead:
    if cfg.model.n_heads < 1:
        raise ValueError("build_head needs a resolved number of heads (model.n_heads >= 1)")
    torch.manual_seed(cfg.seed)
    return MRMHead(dim, cfg.model, learn_inner_lr=cfg.inner.learn_lr, inner_lr=cfg.inner.lr,
                   prior=cfg.inner.optimizer == "newton")


def save_model(uri: str, head: MRMHead, cfg: config_mod.TrainConfig, extra: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    storage.write_bytes(storage.join(uri, MODEL), st_save(tensors))
    storage.write_json(storage.join(uri, MODEL_JSON), {
        "format_version": FORMAT_VERSION, "dim": head.dim, "model": config_mod.to_dict(cfg)["model"],
        "learn_inner_lr": head.log_inner_lr is not None, **(extra or {})})


def save_config(uri: str, cfg: config_mod.TrainConfig) -> None:
    storage.write_json(storage.join(uri, CONFIG), config_mod.to_dict(cfg))


# schema metadata keys: mrm.backbone, mrm.backbone_id, mrm.pooling, mrm.max_length, mrm.dtype, mrm.dim,
# and mrm.finetune_split for a backbone that `mrm finetune` made (FINETUNE_SPLIT)
PROVENANCE_PREFIX = storage.PROVENANCE_PREFIX


def provenance_metadata(fields: dict) -> dict[str, str]:
    """How a table was made, as Parquet schema metadata (written by `mrm embed`)."""
    return {f"{PROVENANCE_PREFIX}{k}": str(v) for k, v in fields.items()}


def provenance(embeddings: str) -> dict:
    """How an embeddings table was made (its schema metadata, written by `mrm embed`); {} when unknown
    (a synthetic table, or one written by other tools)."""
    meta = storage.schema(embeddings).metadata or {}
    return {k.decode()[len(PROVENANCE_PREFIX):]: v.decode() for k, v in meta.items()
            if k.decode().startswith(PROVENANCE_PREFIX)}


def check_same_backbone(tables: dict[str, dict]) -> None:
    """Refuse mixing embeddings of different backbones or poolings ({what: provenance}; unknown ones pass):
    their vectors live in different spaces, so a head trained on one scores the other as noise."""
    known = {what: (p.get("backbone_id") or p.get("backbone"), p.get("pooling"))
             for what, p in tables.items() if p.get("backbone")}
    if len(set(known.values())) > 1:
        names = {what: tables[what].get("backbone") for what in known}
        raise UserError("embeddings from different backbones: " + "; ".join(
            f"{what} from {names[what]} ({pool} pooling)" for what, (_, pool) in known.items()))


# A fine-tuned backbone's config records the keys that chose the users it was fine-tuned on (`mrm finetune`
# writes them, `mrm embed` copies them into the table's provenance, `mrm train` checks them).
FINETUNE_SPLIT = "finetune_split"
FINETUNE_SPLIT_KEYS = ("seed", "seen_ratio", "val_ratio")


def check_finetune_split(made_with: dict, cfg: config_mod.TrainConfig) -> None:
    """Refuse to train on embeddings of a backbone fine-tuned under another split: `mrm train`'s unseen users
    (or its validation carve) could then be users and pairs the backbone was fine-tuned on, and every figure
    on them would read high.  (On another population any split is as good, so matching it costs nothing.)"""
    if FINETUNE_SPLIT not in made_with:
        return
    tuned = json.loads(made_with[FINETUNE_SPLIT])
    differ = [k for k in FINETUNE_SPLIT_KEYS if k in tuned and tuned[k] != getattr(cfg, k)]
    if differ:
        raise UserError("the embeddings come from a backbone fine-tuned with " + ", ".join(
            f"{k}={tuned[k]}" for k in differ) + " and this run has " + ", ".join(
            f"{k}={getattr(cfg, k)}" for k in differ) + ": its unseen users could be ones the backbone was "
            "fine-tuned on; train with the fine-tuning's " + "/".join(differ))


def is_run_directory(uri: str) -> bool:
    return storage.exists(storage.join(uri, CONFIG)) or storage.exists(storage.join(uri, INPUTS))


def save_inputs(uri: str, embeddings: str) -> None:
    storage.write_json(storage.join(uri, INPUTS), {"embeddings": embeddings,
                                                   "fingerprint": storage.fingerprint(embeddings)})


def check_inputs(uri: str, embeddings: str) -> None:
    """A run directory continues only on the table it was started on (same files, same sizes)."""
    path = storage.join(uri, INPUTS)
    if not storage.exists(path):
        return
    saved = storage.read_json(path)
    if saved.get("fingerprint") != storage.fingerprint(embeddings):
        raise UserError(f"{uri} was trained on another embeddings table ({saved.get('embeddings')}) or on an "
                        f"earlier version of it; resume on the same table, or choose a new --out")


def load_run(uri: str) -> Run:
    """Load a finished run; one-line errors for a missing or incompatible directory."""
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise UserError(f"no run directory at {uri}")
    for name in (CONFIG, MODEL_JSON, MODEL):
        if not storage.exists(storage.join(uri, name)):
            raise UserError(f"run {uri} is incomplete: {name} is missing (did training finish?)")
    info = storage.read_json(storage.join(uri, MODEL_JSON))
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        found = info.get("format_version") if isinstance(info, dict) else None
        raise UserError(f"run {uri} has format version {found!r}; this mrm-ray reads version {FORMAT_VERSION}")
    saved = storage.read_json(storage.join(uri, CONFIG))
    if not isinstance(saved, dict):
        raise UserError(f"run {uri}: {CONFIG} is not a config (a JSON mapping)")
    cfg = config_mod.from_dict(saved)
    try:
        dim = int(info["dim"])
        head = build_head(dim, cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"run {uri}: {MODEL_JSON} or {CONFIG} is damaged ({str(e).splitlines()[0][:80]})") from None
    data = storage.read_bytes(storage.join(uri, MODEL))
    try:
        head.load_state_dict(st_load(data))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: safetensors raises its own types
        raise UserError(f"run {uri}: {MODEL} is damaged or does not match {MODEL_JSON} "
                        f"({str(e).splitlines()[0][:100]})") from None
    head.eval()
    return Run(uri, cfg, head, info, hashlib.sha256(data).hexdigest())


def state_to_bytes(state) -> bytes:
    """A meta.TrainState as bytes (plain tensors/numbers only)."""
    buf = io.BytesIO()
    torch.save(dict(state.__dict__), buf)
    return buf.getvalue()


def state_from_bytes(data: bytes):
    from mrm_ray.core.meta import TrainState
    return TrainState(**torch.load(io.BytesIO(data), weights_only=True))
