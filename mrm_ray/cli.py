"""The `mrm` console script, and the only place that knows about argv.

Each command is three things here: its options (an argparse builder), and a
handler that turns the parsed options into a call of the stage's typed
function (`train(cfg, embeddings, out)`, `evaluate(run, embeddings)`, ...)
and prints what a person wants to see.  Job entrypoints (jobs/) hand a YAML
section to `run_command(name, options)`: the same options, checked by the
same parser definitions, without an argv in between.

A user mistake (mrm_ray.errors.UserError) is one line on stderr and exit
status 2; Ctrl-C is status 130; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys

from mrm_ray.errors import UserError

EXIT_USAGE = 2
ADDRESS_HELP = "Ray cluster address (e.g. auto); unset = RAY_ADDRESS, else a new local cluster"


# --- options, one builder per command -------------------------------------------------------
def _synth_args(p) -> None:
    p.add_argument("--out", required=True, help="output table URI (local path or s3://bucket/prefix)")
    p.add_argument("--users", type=int, help="number of users (default: 2000, or the --population's own)")
    p.add_argument("--pairs-per-user", type=int, default=20, help="mean preference pairs per user (ragged)")
    p.add_argument("--kind", default="embedding",     # checked by mrm synth against the schemes it knows
                   help="embedding: an embeddings table (train directly); text: a pairs table (run mrm embed); "
                        "text-hard: a pairs table whose attributes (relations between request and response) a "
                        "frozen encoder does not carry linearly; text-order: one whose attributes only reorder "
                        "the same sentences (both for mrm finetune)")
    p.add_argument("--dim", type=int, help="embedding dimension (--kind embedding; default: 64, or the --population's own)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="embedding storage type")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same population")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output of mrm synth at --out")
    p.add_argument("--population", metavar="NAME",
                   help="a population of the quality zoo instead (mrm_ray.zoo: lowrank, clusters, "
                        "few-users-many-pairs, many-users-few-pairs, noisy-minority, anisotropic-1024, "
                        "homogeneous, individual); --users/--dim change its size only when given")


def _synth(o) -> None:
    from mrm_ray.synth import synth
    print(f"wrote {synth(o.out, o.users, o.pairs_per_user, o.kind, o.dim, o.dtype, o.seed, o.population, o.overwrite)}")


def _prepare_args(p) -> None:
    from mrm_ray.prepare import MIN_CONVERSATIONS, REFERENCE_SEED, SPLIT_SEED
    p.add_argument("dataset", choices=("prism", "reddit"), help="which published dataset the files come from")
    p.add_argument("--source", required=True,
                   help="folder (local or s3://) with the published files: PRISM's conversations.jsonl "
                        "(+ survey.jsonl), or summarize_from_feedback's comparison files (JSON lines or Parquet)")
    p.add_argument("--out", required=True, help="where the pairs table goes (written atomically)")
    p.add_argument("--min-conversations", type=int, default=MIN_CONVERSATIONS,
                   help="PRISM: drop users with fewer conversations that yield pairs")
    p.add_argument("--seed", type=int,
                   help=f"PRISM: seed of the per-user train/test split (default {SPLIT_SEED}; with --reference "
                        f"{REFERENCE_SEED}, the reference train.py's --seed, which must match mrm train's seed)")
    p.add_argument("--post-only", action="store_true",
                   help="Reddit: prompt = the post text alone (the MRM reference) instead of subreddit+title+post")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output of mrm prepare at --out")
    p.add_argument("--reference", action="store_true",
                   help="reproduce the reference code's preprocessing and train/test split exactly (for the "
                        "prism / reddit presets of mrm train; see the command's description)")


def _prepare(o) -> None:
    from mrm_ray.prepare import prepare
    prepare(o.dataset, o.source, o.out, o.min_conversations, o.seed, o.post_only, o.reference, o.overwrite)


def _embed_args(p) -> None:
    from mrm_ray.backbone import DEFAULT_GPU_MODEL, POOLINGS
    p.add_argument("--pairs", required=True, help="pairs table (local path or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="where the embeddings table goes (a new or empty folder; "
                                                 "committed atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output of mrm embed at --out")
    p.add_argument("--model", default="auto",
                   help=f"backbone name or local folder; auto = {DEFAULT_GPU_MODEL} when the cluster has GPUs, "
                        "else the packaged all-MiniLM-L6-v2 (CPU demo)")
    p.add_argument("--pooling", choices=POOLINGS, default="auto",
                   help="last = hidden state of the last real token (decoder reward models); cls/mean for encoders; "
                        "auto picks from the model")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="compute dtype; auto = bfloat16 on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), "
                        "else float32")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="embed every pair's two texts as they come, in input order (default: group pairs by "
                        "conversation, run each distinct text and each shared token prefix, such as a prompt, "
                        "once; output rows then come grouped by conversation)")
    p.add_argument("--emb-dtype", choices=("float32", "float16"), default="float32",
                   help="stored embedding dtype (float16 halves the table)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="max padded tokens per forward pass (texts are sorted by length first); "
                        "0 = 16384 on GPU, 4096 on CPU")
    p.add_argument("--batch-rows", type=int, default=256, help="pairs per Ray batch handed to one replica")
    p.add_argument("--max-length", type=int, default=4096,
                   help="truncate longer texts from the left (keeps the response); truncations are counted")
    p.add_argument("--actors", type=int, default=0,
                   help="max replicas in the autoscaling pool; 0 = one per GPU, or 1 on a CPU-only cluster")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica; default 1 when the cluster has GPUs, else 0")
    p.add_argument("--num-cpus", type=float, default=0.5,
                   help="CPUs reserved per replica (fractional keeps reads running on small machines)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per CPU replica; 0 = the node's cores / --actors")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def _embed(o) -> None:
    from mrm_ray.embed import embed
    embed(o.pairs, o.out, o.model, o.pooling, o.dtype, o.emb_dtype, o.batch_tokens, o.batch_rows, o.max_length,
          o.actors, o.num_gpus, o.num_cpus, o.threads, o.address, o.overwrite, o.dedup)


def _train_args(p) -> None:
    from mrm_ray.config import PRESETS
    p.add_argument("--embeddings", required=True, help="embeddings table URI (output of mrm embed / mrm synth)")
    p.add_argument("--out", required=True, help="run directory URI; an existing run there is resumed")
    p.add_argument("--config", help="YAML config file (keys of mrm_ray.core.config.TrainConfig; may set `preset:`)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named overrides of the defaults: v0.1 (0.1.0's default), prism or reddit (the "
                        "reference's settings); unset = the defaults, or the config file's `preset:`")
    p.add_argument("--workers", type=int, help="Ray Train workers (same as num_workers=N)")
    p.add_argument("--local", action="store_true", help="train in this process without Ray (small data, debugging)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=5 inner.steps=8 rpo.alpha=0.3")


def _train(o) -> None:
    from mrm_ray import config as config_mod
    from mrm_ray.train import train
    overrides = _overrides(o.overrides)
    if o.workers is not None:
        overrides["num_workers"] = o.workers
    cfg = config_mod.load_config(o.preset, o.config, overrides)
    train(cfg, o.embeddings, o.out, local=o.local, address=o.address,
          explicit=config_mod.asks_for_config(o.preset, o.config, overrides),
          placement=set(overrides) & set(config_mod.PLACEMENT_KEYS))


def _finetune_args(p) -> None:
    p.add_argument("--pairs", required=True, help="pairs table URI (mrm prepare / mrm synth --kind text)")
    p.add_argument("--out", required=True, help="fine-tuning directory URI; the backbone goes to <out>/model; "
                                                "an unfinished one there is continued")
    p.add_argument("--model", default="auto",
                   help="backbone to fine-tune (name or path); auto = the packaged all-MiniLM-L6-v2 on CPU, "
                        "Skywork-Reward-V2-Llama-3.1-8B with use_gpu=true")
    p.add_argument("--config", help="YAML config file (keys of mrm_ray.core.finetune.FinetuneConfig)")
    p.add_argument("--overwrite", action="store_true", help="start afresh over a previous fine-tuning at --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=6 top_layers=0 num_workers=2 zero_stage=3")


def _finetune(o) -> None:
    from mrm_ray.finetune import finetune, load_config
    summary = finetune(o.pairs, o.out, o.model, load_config(o.config, _overrides(o.overrides)), o.overwrite)
    kept = [h for h in summary["history"] if h["kept"]][-1]
    print(f"fine-tuned {summary['model']} for {len(summary['history'])} epoch(s) in {summary['seconds']:.0f}s; "
          f"kept epoch {kept['epoch']} (validation accuracy {kept['val_accuracy'] or float('nan'):.4f}); "
          f"backbone: {o.out.rstrip('/')}/model")


def _evaluate_args(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by mrm train")
    p.add_argument("--embeddings", required=True, help="embeddings table to evaluate (train pairs adapt, test pairs score)")
    p.add_argument("--out", help="metrics JSON file (default: <run>/metrics.json); per_user.parquet and plots go beside it")
    p.add_argument("--no-baseline", action="store_true", help="skip the shared Bradley-Terry baseline")
    p.add_argument("--overwrite", action="store_true", help="replace a previous evaluation at --out")


def _evaluate(o) -> None:
    from mrm_ray.data import runs, storage
    from mrm_ray.evaluate import evaluate

    def fmt(d: dict | None) -> str:
        if not d or d.get("accuracy") is None:
            return "   n/a"
        return f"{d['accuracy']:.4f} (worst10 {d['worst10_accuracy']:.4f}, {d['users']} users)"
    m = evaluate(runs.load_run(o.run), o.embeddings, o.out, baseline=not o.no_baseline, overwrite=o.overwrite)
    rows = [("MRM", m)] + ([("shared BT", m["baselines"]["shared_bt"])] if "baselines" in m else []) + (
        [("oracle", m["oracle"])] if "oracle" in m else [])
    for name, d in rows:
        print(f"{name:10s} seen {fmt(d['seen'])}  unseen {fmt(d['unseen'])}")
    p = m["personalization"]
    g = p["unseen_gain_over_prior"]
    if g is not None:
        print(f"personalization: {g['mean'] * 100:+.2f} points over the population prior on unseen users "
              f"(95% interval {g['ci95'][0] * 100:+.2f} to {g['ci95'][1] * 100:+.2f}); "
              f"spread of user weights {[round(x, 3) for x in p['weight_std']]}")
    if "warning" in p:
        logging.getLogger("mrm_ray.evaluate").warning("%s", p["warning"])
    print(f"metrics: {o.out or storage.join(o.run, runs.METRICS)}")


def _score_args(p) -> None:
    from mrm_ray.score import ROWS_PER_PART
    p.add_argument("--run", required=True, help="run directory written by mrm train")
    p.add_argument("--support", required=True,
                   help="embeddings table of the users' labelled pairs to adapt on (user_id, chosen_emb, rejected_emb)")
    p.add_argument("--candidates", required=True, help="candidates table: user_id, candidate_id, emb")
    p.add_argument("--out", required=True,
                   help="output folder (new or empty; committed atomically): scores/, weights/, summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output of mrm score at --out")
    p.add_argument("--support-split", choices=("all", "train"), default="all",
                   help="all: every support row adapts its user; train: only rows with split=train")
    p.add_argument("--steps", type=int, default=None, help="inner steps; unset = the run's eval_inner_steps")
    p.add_argument("--partitions", type=int, default=0,
                   help=f"user buckets; 0 = one per {ROWS_PER_PART:,} input rows")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def _score(o) -> None:
    from mrm_ray.data import runs, storage
    from mrm_ray.score import SCORES, score
    s = score(runs.load_run(o.run), o.support, o.candidates, o.out, o.support_split, o.partitions, o.steps,
              o.overwrite, o.address)
    print(f"scored {s['candidates_scored']} candidates of {s['users']} users ({s['prior_users']} with no support pairs "
          f"scored with the prior) in {s['seconds']:.1f}s: {storage.join(o.out, SCORES)}")


def _compare_args(p) -> None:
    from mrm_ray.compare import DEFAULT_METHODS, METHODS
    from mrm_ray.config import PRESETS
    p.add_argument("--embeddings", required=True, help="embeddings table URI (train pairs adapt, test pairs score)")
    p.add_argument("--out", required=True, help="report directory; MRM runs go to DIR/runs/ (re-running resumes them)")
    p.add_argument("--config", help="YAML config for both MRM variants (also fixes the split seed and K)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="MRM starting config (unset: the defaults)")
    p.add_argument("--epochs", type=int, help="MRM meta-training epochs (same as epochs=N)")
    p.add_argument("--questions", type=int, default=8, help="active onboarding: questions per unseen user")
    p.add_argument("--ray", action="store_true", help="train the MRM variants with Ray Train instead of in-process")
    p.add_argument("--address", default=None, help=ADDRESS_HELP + " (with --ray)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished comparison at --out")
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   default=list(DEFAULT_METHODS),
                   help="comma-separated methods, of: " + ", ".join(k for k, _ in METHODS if k != "oracle")
                        + " (oracle is added for synthetic populations; mrm_rpo is always run)")
    p.add_argument("--reference-preset", default="reddit", choices=("prism", "reddit"),
                   help="the reference's recipe for the mrm_ref method")
    p.add_argument("--reference-epochs", type=int, help="epochs of mrm_ref (default: the preset's 200)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for both MRM variants, e.g. inner.steps=8 model.n_heads=3")


def _compare(o) -> None:
    from mrm_ray.compare import compare, markdown
    from mrm_ray.data import storage
    report = compare(o.embeddings, o.out, o.preset, o.config, _overrides(o.overrides), o.epochs, o.questions, o.ray,
                     o.overwrite, o.methods, o.reference_preset, o.reference_epochs, o.address)
    print(markdown(report))
    print(f"report: {storage.join(o.out, 'comparison.md')} ({report['seconds']:.0f}s)")


def _export_args(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by mrm train")
    p.add_argument("--user", required=True, help="the user_id to export")
    p.add_argument("--backbone", required=True,
                   help="the backbone that embedded the pairs (name or local folder): a reward model or a base decoder")
    p.add_argument("--out", required=True, help="output folder for the transformers checkpoint (local or s3://)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="mrm score output (or its weights/ table) holding the user's adapted theta; "
                                       "with neither --weights nor --support: <run>/per_user.parquet of mrm evaluate")
    src.add_argument("--support", help="embeddings table: adapt the user on its rows now")
    p.add_argument("--prior", action="store_true",
                   help="export the population prior theta_0 when the user has no weights or pairs (else an error)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out")
    p.add_argument("--support-split", choices=("all", "train"), default="all",
                   help="with --support: adapt on all of the user's rows, or only split=train")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights dtype of the saved checkpoint (auto: the backbone's own)")


def _export(o) -> None:
    from mrm_ray.export import export
    rec = export(o.run, o.user, o.backbone, o.out, o.weights, o.support, o.support_split, o.dtype,
                 overwrite=o.overwrite, prior=o.prior)
    what = "population prior (user not found)" if rec["source"] == "prior" else f"adapted weights ({rec['source']})"
    print(f"exported user {o.user!r} ({what}, theta={[round(t, 4) for t in rec['theta']]}) to {o.out}")


def _demo_args(p) -> None:
    p.add_argument("--workdir", default="mrm-demo", help="where every table, the run and the report go")
    p.add_argument("--users", type=int, default=200, help="synthetic users (text population)")
    p.add_argument("--pairs-per-user", type=int, default=16, help="mean preference pairs per user")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--epochs", type=int, help="meta-training epochs (default: the config's)")
    p.add_argument("--model", help="backbone (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune the backbone (mrm finetune, its defaults; needs the finetune extra) and run "
                        "embed -> train -> evaluate again on it; the summary holds both backbones' accuracies")


def _demo(o) -> None:
    from mrm_ray.demo import demo
    print(json.dumps(demo(o.workdir, o.users, o.pairs_per_user, o.workers, o.epochs, o.model, o.finetune), indent=2))


def _overrides(items) -> dict:
    """KEY=VALUE arguments (a list) or a job config's `overrides:` mapping -> nested dict."""
    from mrm_ray import config as config_mod
    return dict(items) if isinstance(items, dict) else config_mod.parse_overrides(items or [])


# name -> (module whose docstring describes it, one-line help, options, handler).  Pipeline order.
COMMANDS = {
    "synth": ("mrm_ray.synth", "write a synthetic user population with known ground truth", _synth_args, _synth),
    "prepare": ("mrm_ray.prepare", "convert PRISM or Reddit TL;DR files into the pairs table", _prepare_args,
                _prepare),
    "finetune": ("mrm_ray.finetune", "fine-tune the backbone's top blocks for personalization (Ray Train, DeepSpeed)",
                 _finetune_args, _finetune),
    "embed": ("mrm_ray.embed", "embed preference pairs with a frozen reward model (Ray Data)", _embed_args, _embed),
    "train": ("mrm_ray.train", "meta-train MRM (+RPO) on an embeddings table (Ray Train)", _train_args, _train),
    "evaluate": ("mrm_ray.evaluate", "adapt every user on its train pairs, score its test pairs", _evaluate_args,
                 _evaluate),
    "score": ("mrm_ray.score", "bulk-score a user population's candidates (Ray tasks over user buckets)",
              _score_args, _score),
    "compare": ("mrm_ray.compare", "MRM, MRM+RPO and baselines on one split: table and plot", _compare_args,
                _compare),
    "export-hf": ("mrm_ray.export", "write one user's reward model as a transformers checkpoint", _export_args,
                  _export),
    "demo": ("mrm_ray.demo", "the whole chain on the embedded defaults (local Ray, local files)", _demo_args, _demo),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `mrm` parser; with `only`, just that command's options are built (`mrm train --help` stays fast)."""
    parser = argparse.ArgumentParser(
        prog="mrm", description="Meta Reward Modeling at scale: personalized reward models for millions of users.",
        epilog="Run 'mrm COMMAND --help' for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_, add, _) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_, add_help=False)  # listed, options not loaded
            continue
        doc = importlib.import_module(module).__doc__ or help_
        add(sub.add_parser(name, help=help_, description=doc.strip().split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; one of: {', '.join(COMMANDS)}")
    p = argparse.ArgumentParser(prog=f"mrm {name}")
    COMMANDS[name][2](p)
    return p


def options(name: str, given: dict) -> argparse.Namespace:
    """A mapping of options (a job config's section: keys are the long options, `_` or `-`) checked by the
    command's own definitions: unknown keys, missing required ones, choices and types are one-line errors."""
    actions = {a.dest: a for a in command_parser(name)._actions if a.dest != "help"}
    values = {dest: a.default for dest, a in actions.items()}
    for key, value in given.items():
        dest = str(key).replace("-", "_")
        a = actions.get(dest)
        if a is None:
            raise UserError(f"{name}: unknown option {key!r}; known: {', '.join(sorted(actions))}")
        if value is not None and a.type is not None and isinstance(value, str):
            try:
                value = a.type(value)
            except (TypeError, ValueError):
                raise UserError(f"{name}: option {key!r} expects {getattr(a.type, '__name__', 'a value')}, "
                                f"got {value!r}") from None
        if a.choices is not None and value is not None and value not in a.choices:
            raise UserError(f"{name}: option {key!r} must be one of {', '.join(map(str, a.choices))}, got {value!r}")
        values[dest] = value
    missing = [f"--{d.replace('_', '-')}" if a.option_strings else d for d, a in actions.items()
               if a.required and values[d] is None]
    if missing:
        raise UserError(f"{name}: missing required option(s) {', '.join(missing)}")
    return argparse.Namespace(**values)


def command_line(name: str, o: argparse.Namespace) -> str:
    """The `mrm` command line equivalent to resolved options (what a job prints before it runs a stage)."""
    words = ["mrm", name]
    for a in command_parser(name)._actions:
        value = getattr(o, a.dest, None)
        if a.dest == "help" or value is None or value is False or value == a.default:
            continue
        if not a.option_strings:   # positionals: prepare's dataset, train/compare's overrides
            words += [f"{k}={v}" for k, v in _flat(value)] if isinstance(value, dict) else (
                [str(v) for v in value] if isinstance(value, list) else [str(value)])
        elif value is True:
            words.append(a.option_strings[-1])
        else:
            words += [a.option_strings[-1], ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def _flat(mapping: dict, prefix: str = ""):
    for k, v in mapping.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", "null" if v is None else str(v).lower() if isinstance(v, bool) else v


def run_command(name: str, o: argparse.Namespace) -> int:
    """Run one command's handler: 0, or 2 with one line on stderr for a user's mistake, 130 on Ctrl-C."""
    try:
        COMMANDS[name][3](o)
        return 0
    except UserError as e:
        print(f"mrm {name}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mrm {name}: interrupted", file=sys.stderr)
        return 130


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Load only the chosen command's options: `mrm train --help` should not import transformers.
    only = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only).parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
