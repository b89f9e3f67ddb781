"""MRM, MRM+RPO and the baselines on one split, one table (`mrm compare`).

    mrm compare --embeddings data/emb --out cmp/                        # default config, local training
    mrm compare --embeddings data/emb --out cmp/ --epochs 5 inner.lr=2.0
    mrm compare --embeddings data/emb --out cmp/ --config exp.yaml --ray  # MRM variants on Ray Train

Methods, all on the same embeddings, the same seen/unseen split (seed and
seen_ratio of the config), the same train-pair caps and the same metrics:
  shared BT   one Bradley-Terry reward for everyone, fit on the seen users' train pairs
  LoRe        jointly learned basis + per-user softmax weights; new users by 100 Adam steps from a neutral start
  PReF        SVD-initialised logistic matrix factorization; new users by regularized maximum likelihood
  MRM ref.    MRM with the reference's settings (--reference-preset, default reddit): the paper's MRM
  MRM         our default (or --preset/--config) without the robust objective (rpo.enabled=false)
  MRM+RPO     the same with the robust objective (the config's rpo section, enabled)
  MRM 0.1.0   0.1.0's default (the v0.1 preset; only with --methods ... mrm_v01)
  oracle      the true reward of each user (synthetic populations only): a ceiling
Every method adapts every user (seen and unseen) on its train pairs and is scored
on its test pairs; the few-shot columns adapt on 1, 2, 4, 8, 16 train pairs.
Both MRM variants are trained and evaluated by `mrm train` / `mrm evaluate`
(run directories under DIR/runs/); the baselines select their hyperparameters
on the same validation carve of the seen users' train pairs as MRM.

Active onboarding (mrm_ray.core.active): unseen users with at least 2 x --questions
train pairs get their train pairs as an unlabeled pool and answer --questions
questions chosen by uncertainty, margin or at random; after each answer they
are re-adapted from the MRM+RPO theta_0 and scored on their test pairs.

Outputs in DIR: comparison.md (tables), comparison.json (everything), few_shot.png,
active.png, per_user.parquet (every method's accuracy per user).

The baselines hold the whole table in memory (one float32 difference per pair):
meant for research-sized populations; `mrm evaluate` is the scalable path.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mrm_ray import config as config_mod
from mrm_ray import synth
from mrm_ray.core import active, baselines, splits
from mrm_ray.data import runs, shards, storage
from mrm_ray.data import contract as C
from mrm_ray.core import metrics as M
from mrm_ray.errors import UserError
from mrm_ray.core.meta import single_thread

log = logging.getLogger(__name__)

SHOTS = (1, 2, 4, 8, 16)
BT_MAX_PAIRS = 500_000
# (key, label) in table order; the key prefixes the per-user columns.
METHODS = (("shared_bt", "shared BT"), ("lore", "LoRe"), ("pref", "PReF"), ("mrm_ref", "MRM, reference preset"),
           ("mrm_v01", "MRM, 0.1.0 default"), ("mrm", "MRM (no RPO)"), ("mrm_rpo", "MRM + RPO"),
           ("oracle", "oracle (truth)"))
DEFAULT_METHODS = ("shared_bt", "lore", "pref", "mrm_ref", "mrm", "mrm_rpo")
BASELINES = ("shared_bt", "lore", "pref")
# MRM variants: key -> (preset: None = the command's --preset/--config, overrides)
MRM_VARIANTS = {"mrm_ref": ("reference", {}), "mrm_v01": ("v0.1", {}),
                "mrm": (None, {"rpo": {"enabled": False}}), "mrm_rpo": (None, {"rpo": {"enabled": True}})}
# The keys that fix the seen/unseen split and the caps: every variant shares them.
SPLIT_KEYS = ("seed", "seen_ratio", "min_train_pairs")
ACTIVE_STRATEGIES = ("uncertainty", "margin", "random")
RANDOM_REPEATS = 5


# --- MRM variants: through the train / evaluate stages ----------------------------------
def variant_config(key: str, opts: dict) -> config_mod.TrainConfig:
    """The config of one MRM variant: the one under test (opts' preset, config file, overrides and epochs)
    with RPO off or on, or a fixed recipe that shares only the split keys with it."""
    preset, extra = MRM_VARIANTS[key]
    overrides = opts["overrides"]
    if preset is None:   # the configuration under test
        more = {**({"epochs": opts["epochs"]} if opts["epochs"] else {}), **extra}
        return config_mod.load_config(opts["preset"], opts["config"], config_mod.merge(overrides, more))
    preset = opts["reference_preset"] if preset == "reference" else preset
    shared = {k: v for k, v in overrides.items() if k in SPLIT_KEYS}
    if key == "mrm_ref" and opts["reference_epochs"]:
        shared["epochs"] = opts["reference_epochs"]
    return config_mod.load_config(preset, overrides=config_mod.merge(shared, extra))


def train_and_evaluate_mrm(key: str, opts: dict, embeddings: str, out: str) -> tuple[runs.Run, pa.Table, dict]:
    """Train (or resume) one MRM variant into DIR/runs/<key>, evaluate it; (run, per-user table, metrics)."""
    from mrm_ray.evaluate import evaluate
    from mrm_ray.train import train
    run_dir = storage.join(out, "runs", key)
    t0 = time.time()
    try:
        run = train(variant_config(key, opts), embeddings, run_dir, local=not opts["ray"], address=opts["address"])
    except ModuleNotFoundError as e:
        if not opts["ray"]:
            raise
        raise UserError(f"--ray needs {e.name}, which this install lacks; drop --ray to train locally") from None
    metrics = evaluate(run, embeddings, storage.join(run_dir, runs.METRICS), baseline=False, overwrite=True,
                       shots=SHOTS)
    log.info("%s: trained and evaluated in %.1fs (unseen accuracy %.4f)", key, time.time() - t0,
             metrics["unseen"]["accuracy"] or float("nan"))
    return run, storage.read_table(storage.join(run_dir, runs.PER_USER)), metrics


# --- baselines: in memory ----------------------------------------------------------------
def load_population(embeddings: str) -> splits.UserPairs:
    schema = storage.check_table(embeddings)
    C.require_columns(schema, C.EMBEDDINGS_REQUIRED, "embeddings")
    cols = [c for c in (C.USER_ID, C.PAIR_ID, C.CONV_ID, C.SPLIT, C.CHOSEN_EMB, C.REJECTED_EMB) if c in schema.names]
    shard = shards.user_pairs_from_table(C.normalize_embeddings(storage.read_table(embeddings, columns=cols)))
    if shard.is_test is None or not shard.is_test.any():
        raise UserError(f"{embeddings} has no test pairs (split == 'test'): nothing to score")
    return shard


def _per_user_accuracy(margin: torch.Tensor, seg: torch.Tensor, n_users: int) -> np.ndarray:
    c, n = M.per_user_correct(margin, seg, n_users)
    return np.where(n.numpy() > 0, (c / n.clamp(min=1)).numpy(), np.nan)


def score_baselines(shard: splits.UserPairs, seen: np.ndarray, cfg: config_mod.TrainConfig,
                    which=BASELINES) -> tuple[dict, dict]:
    """Fit shared BT, LoRe and PReF (those in `which`) on the seen users; per-user accuracy columns of every user."""
    pu = shard.pair_user()
    support, test = splits.adaptation_rows(shard, seen, cfg), shard.is_test
    seen_shard = shard.select(support & seen[pu], keep_empty_users=False)
    if seen_shard.n_users == 0:
        raise UserError("no seen user has train pairs: nothing to fit the baselines on")
    seen_seg = torch.from_numpy(seen_shard.pair_user())
    val = torch.from_numpy(splits.validation_mask(seen_shard, cfg.val_ratio, cfg.seed))
    seg = torch.from_numpy(pu)
    te = torch.from_numpy(test)
    n_train = np.bincount(pu, weights=~test, minlength=shard.n_users)
    shot_masks = {k: splits.cap_pairs(shard, k, cfg.seed, eligible=~test) for k in SHOTS}
    cols, info = {}, {}

    t0 = time.time()
    v = baselines.fit_shared_bt(seen_shard.diff[:BT_MAX_PAIRS])
    acc = _per_user_accuracy(shard.diff[te] @ v, seg[te], shard.n_users)
    cols["shared_bt_accuracy"] = acc
    for k in SHOTS:  # no adaptation: the same reward whatever the support
        cols[f"shared_bt_acc_{k}_shot"] = np.where(n_train >= k, acc, np.nan)
    info["shared_bt"] = {"seconds": time.time() - t0}
    log.info("shared BT: fit on %d pairs in %.1fs", min(len(seen_shard.diff), BT_MAX_PAIRS), time.time() - t0)

    k_heads = max(2, cfg.model.n_heads)  # K of the run under test; at least 2, or they are one shared reward
    fits = (("lore", lambda: baselines.fit_lore(seen_shard.diff, seen_seg, seen_shard.n_users, val,
                                                baselines.LoReConfig(n_heads=k_heads, seed=cfg.seed))),
            ("pref", lambda: baselines.fit_pref(seen_shard.diff, seen_seg, seen_shard.n_users, val,
                                                baselines.PReFConfig(n_heads=k_heads))))
    for key, fit in fits:
        if key not in which:
            continue
        t0 = time.time()
        model = fit()
        sup = torch.from_numpy(support)
        theta = model.fit_users(shard.diff[sup], seg[sup], shard.n_users)
        cols[f"{key}_accuracy"] = _per_user_accuracy(model.margins(theta, shard.diff[te], seg[te]), seg[te],
                                                     shard.n_users)
        for k, mask in shot_masks.items():
            m = torch.from_numpy(mask)
            theta_k = model.fit_users(shard.diff[m], seg[m], shard.n_users)
            acc = _per_user_accuracy(model.margins(theta_k, shard.diff[te], seg[te]), seg[te], shard.n_users)
            cols[f"{key}_acc_{k}_shot"] = np.where(n_train >= k, acc, np.nan)
        info[key] = {"seconds": time.time() - t0, "new_user_regularization": model.l2, "history": model.history}
        log.info("%s: fit and scored in %.1fs (new-user regularization %g)", model.name, time.time() - t0, model.l2)
    return cols, info


# --- active onboarding ---------------------------------------------------------------------
def active_curves(run: runs.Run, shard: splits.UserPairs, seen: np.ndarray, n_questions: int) -> dict:
    """Accuracy after 0..n_questions answers, per strategy, on unseen users with >= 2 n_questions train pairs."""
    pu = shard.pair_user()
    support = splits.adaptation_rows(shard, seen, run.cfg)
    n_pool = np.bincount(pu, weights=support, minlength=shard.n_users)
    n_test = np.bincount(pu, weights=shard.is_test, minlength=shard.n_users)
    users = np.flatnonzero(~seen & (n_pool >= 2 * n_questions) & (n_test > 0))
    out = {"users": int(len(users)), "questions": n_questions, "min_pool": 2 * n_questions, "curves": {}}
    if len(users) == 0 or n_questions < 1:
        return out
    rows, seg = shard.rows(users)
    pool, test = support[rows], shard.is_test[rows]
    seg_t, rows_t = torch.from_numpy(seg), torch.from_numpy(rows)
    pool_t, test_t = torch.from_numpy(pool), torch.from_numpy(test)
    diff = shard.diff[rows_t]
    kw = dict(test_diff=diff[test_t], test_seg=seg_t[test_t], n_users=len(users))
    # Pool rows are oriented chosen - rejected, so every answer is "the first"; the
    # criteria are symmetric in the sign of a pair, so the orientation leaks nothing.
    labels = torch.ones(int(pool.sum()), dtype=torch.bool)
    for strategy in ACTIVE_STRATEGIES:
        repeats = RANDOM_REPEATS if strategy == "random" else 1
        curves = [active.onboard(run.head, run.cfg, diff[pool_t], seg_t[pool_t], labels, n_questions, strategy,
                                 seed=run.cfg.seed + r, **kw).curve for r in range(repeats)]
        out["curves"][strategy] = np.mean(curves, axis=0).tolist()
    return out


# --- report ----------------------------------------------------------------------------------
def summarize_methods(per_user: pa.Table, keys) -> dict:
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    pairs = per_user.column("test_pairs").to_numpy()
    out = {}
    for key in keys:
        acc = per_user.column(f"{key}_accuracy").to_numpy(zero_copy_only=False)
        ok = pairs > 0
        summary = M.report({"seen": seen[ok], "accuracy": acc[ok], "test_pairs": pairs[ok]})
        summary["few_shot"] = M.few_shot(
            {k: per_user.column(f"{key}_acc_{k}_shot").to_numpy(zero_copy_only=False) for k in SHOTS}, seen, ok)
        out[key] = summary
    return out


def paired_differences(per_user: pa.Table, keys, reference: str = "mrm_rpo") -> dict:
    """Per unseen user, reference minus method accuracy (all train pairs, and 1 support pair):
    mean with a normal 95% interval.  Paired, so the users' own difficulty cancels."""
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    ok = (per_user.column("test_pairs").to_numpy() > 0) & ~seen

    def col(key, suffix):
        return per_user.column(f"{key}_{suffix}").to_numpy(zero_copy_only=False)[ok].astype(np.float64)
    out = {}
    for key in keys:
        if key == reference:
            continue
        diffs = {"all": M.paired(col(reference, "accuracy"), col(key, "accuracy")),
                 "1_shot": M.paired(col(reference, "acc_1_shot"), col(key, "acc_1_shot"))}
        if diffs["all"] is not None:
            out[key] = diffs
    return out


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    labels = dict(METHODS)
    d, methods = report["data"], report["methods"]
    lines = [
        "# MRM vs baselines",
        "",
        f"Embeddings `{d['embeddings']}`: {d['users']} users ({d['seen_users']} seen, {d['unseen_users']} unseen), "
        f"{d['pairs']} pairs, dim {d['dim']}; split seed {d['seed']}, K = {d['n_heads']} base rewards, "
        f"MRM {d['epochs']} epochs.",
        "",
        "Mean per-user test accuracy (ties count as wrong).  worst-10% and std are over unseen users; "
        "@k: unseen users adapted on k train pairs (users with at least k).",
        "",
        "| method | seen | unseen | overall | worst-10% | std | " + " | ".join(f"@{k}" for k in SHOTS) + " |",
        "|---|" + "---:|" * (5 + len(SHOTS)),
    ]
    for key, m in methods.items():
        fs = [_f(m["few_shot"][str(k)]["unseen"]) for k in SHOTS]
        lines.append(f"| {labels[key]} | {_f(m['seen']['accuracy'])} | {_f(m['unseen']['accuracy'])} | "
                     f"{_f(m['overall']['accuracy'])} | {_f(m['unseen']['worst10_accuracy'])} | "
                     f"{_f(m['unseen']['std'])} | " + " | ".join(fs) + " |")
    if report.get("paired"):
        lines += ["", "MRM + RPO minus each method, paired per unseen user: mean [95% interval]:", "",
                  "| method | all train pairs | 1 support pair | users |", "|---|---:|---:|---:|"]

        def cell(p):
            return "n/a" if p is None else f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
        for key, p in report["paired"].items():
            lines.append(f"| {labels[key]} | {cell(p['all'])} | {cell(p['1_shot'])} | {p['all']['users']} |")
    a = report.get("active")
    if a and a["curves"]:
        n = a["questions"]
        lines += ["", f"Active onboarding (MRM + RPO): accuracy of {a['users']} unseen users (those with at least "
                  f"{a['min_pool']} train pairs as the unlabeled pool) after q questions; q = 0 is theta_0 alone. "
                  f"random: mean of {RANDOM_REPEATS} seeds.", "",
                  "| strategy | " + " | ".join(f"q={q}" for q in range(n + 1)) + " |",
                  "|---|" + "---:|" * (n + 1)]
        for s, curve in a["curves"].items():
            lines.append(f"| {s} | " + " | ".join(_f(c) for c in curve) + " |")
    elif a:
        lines += ["", f"Active onboarding: no unseen user has {a['min_pool']} train pairs; skipped."]
    lines.append("")
    return "\n".join(lines)


def write_plots(out: str, report: dict) -> None:
    from mrm_ray import plots
    labels = dict(METHODS)
    curves = {labels[key]: {k: m["few_shot"][str(k)]["unseen"] for k in SHOTS}
              for key, m in report["methods"].items()}
    storage.write_bytes(storage.join(out, "few_shot.png"),
                        plots.few_shot(curves, title="unseen users: accuracy vs number of support pairs"))
    a = report.get("active")
    if a and a["curves"]:
        storage.write_bytes(storage.join(out, "active.png"), plots.few_shot(
            {s: {q: c[q] for q in range(1, len(c))} for s, c in a["curves"].items()},
            title="active onboarding (MRM + RPO): accuracy vs questions asked"))


def compare(embeddings: str, out: str, preset: str | None = None, config: str | None = None,
            overrides: list[str] | dict | None = None, epochs: int | None = None, questions: int = 8,
            ray: bool = False, overwrite: bool = False, methods=DEFAULT_METHODS, reference_preset: str = "reddit",
            reference_epochs: int | None = None, address: str | None = None) -> dict:
    """Train/fit every method, score them on one split, write the report into `out`; returns it.

    preset/config/overrides/epochs: the MRM configuration under test (both variants); ray: train the MRM
    variants on Ray Train instead of in this process.  mrm_rpo is always run.
    """
    overrides = overrides if isinstance(overrides, dict) else config_mod.parse_overrides(overrides or [])
    if epochs is not None and epochs < 1:
        raise UserError("--epochs must be >= 1")
    if questions < 0:
        raise UserError("--questions must be >= 0")
    if "enabled" in (overrides.get("rpo") or {}):
        raise UserError("rpo.enabled is set by compare itself (one variant without RPO, one with)")
    known = {k for k, _ in METHODS if k != "oracle"}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    methods = list(methods) + ([] if "mrm_rpo" in methods else ["mrm_rpo"])
    if reference_preset not in ("prism", "reddit"):
        raise UserError("--reference-preset must be prism or reddit")
    if reference_epochs is not None and reference_epochs < 1:
        raise UserError("--reference-epochs must be >= 1")
    opts = {"preset": preset, "config": config, "overrides": overrides, "epochs": epochs, "ray": ray,
            "reference_preset": reference_preset, "reference_epochs": reference_epochs, "address": address}
    for key in MRM_VARIANTS:   # every variant's config is valid before anything runs
        if key in methods:
            variant_config(key, opts)
    t_start = time.time()
    # the report folder is compare's: an unfinished one is continued (its runs resume), a finished one
    # is redone only with --overwrite, anything else is refused
    storage.check_output(out, "compare", [embeddings], overwrite=True)   # ownership, before reading anything
    shard = load_population(embeddings)   # validates the whole table before any training
    storage.claim_folder(out, "compare", [embeddings], overwrite=overwrite, resume=True)
    if overwrite:   # redo it: its own runs start afresh instead of resuming (perhaps on another table)
        storage.delete(storage.join(out, "runs"))
    variants = [k for k in MRM_VARIANTS if k in methods]
    results = {}
    for key in variants:
        log.info("compare: training and evaluating %s", key)
        results[key] = train_and_evaluate_mrm(key, opts, embeddings, out)
    run = results["mrm_rpo"][0]
    cfg = run.cfg
    users = run.users()
    seen_ids = users.filter(pc.and_(users.column("seen"), pc.invert(users.column("skipped")))).column("user_id")
    seen = pc.is_in(pa.array(shard.user_ids.astype(str)), pa.array(seen_ids.to_numpy(zero_copy_only=False).astype(str)))
    seen = seen.to_numpy(zero_copy_only=False)
    with single_thread():
        cols, info = score_baselines(shard, seen, cfg, [k for k in BASELINES if k in methods])
    pu, n = shard.pair_user(), shard.n_users
    per_user = pa.table({C.USER_ID: shard.user_ids.astype(str), "seen": seen,
                         "train_pairs": np.bincount(pu, weights=~shard.is_test, minlength=n).astype(np.int64),
                         "test_pairs": np.bincount(pu, weights=shard.is_test, minlength=n).astype(np.int64),
                         **cols})
    for key in variants:  # the evaluate stage's per-user results, joined by user id
        pt = results[key][1]
        keep = [C.USER_ID, "accuracy"] + [f"acc_{k}_shot" for k in SHOTS]
        renamed = pt.select(keep).rename_columns([C.USER_ID] + [f"{key}_{c}" for c in keep[1:]])
        per_user = per_user.join(renamed, C.USER_ID)
    keys = [k for k, _ in METHODS if k in methods]
    truth = synth.read_truth(embeddings)
    if truth is not None:
        per_user = per_user.join(truth.select([C.USER_ID, "oracle_test_accuracy"]), C.USER_ID)
        oracle = per_user.column("oracle_test_accuracy").to_numpy(zero_copy_only=False).astype(np.float64)
        n_train = per_user.column("train_pairs").to_numpy()
        per_user = per_user.append_column("oracle_accuracy", pa.array(oracle))
        for k in SHOTS:  # knows the truth: no support needed
            per_user = per_user.append_column(f"oracle_acc_{k}_shot", pa.array(np.where(n_train >= k, oracle, np.nan)))
        keys.append("oracle")
    per_user = per_user.sort_by(C.USER_ID)
    log.info("compare: active onboarding (%d questions)", questions)
    with single_thread():
        act = active_curves(run, shard, seen, questions)
    has = per_user.column("test_pairs").to_numpy() > 0
    seen_pu = per_user.column("seen").to_numpy(zero_copy_only=False)
    report = {
        "data": {"embeddings": embeddings, "users": int(shard.n_users), "pairs": int(shard.n_pairs),
                 "dim": int(shard.dim), "seen_users": int((has & seen_pu).sum()),
                 "unseen_users": int((has & ~seen_pu).sum()), "seed": cfg.seed, "n_heads": cfg.model.n_heads,
                 "epochs": cfg.epochs},
        "methods": summarize_methods(per_user, keys),
        "paired": paired_differences(per_user, [k for k in keys if k != "oracle"]),
        "active": act,
        "baselines": info,
        "runs": {key: storage.join(out, "runs", key) for key in variants},
        "config": config_mod.to_dict(cfg),
    }
    storage.write_table(per_user, storage.join(out, "per_user.parquet"), "compare", overwrite=True)
    write_plots(out, report)
    storage.write_bytes(storage.join(out, "comparison.md"), markdown(report).encode())
    report["seconds"] = time.time() - t_start
    storage.write_json(storage.join(out, "comparison.json"), report)
    storage.finish_folder(out, "compare", ["comparison.json", "comparison.md", "per_user.parquet", "runs"])
    return report
