"""What every job entrypoint in jobs/ shares: a YAML config becomes an `mrm` argv.

A job config is a YAML mapping.  A chain file (jobs/configs/*.yaml) holds one
section per stage, named like the `mrm` command (`embed:`, `train:`, ...), plus
an optional `stages:` list saying which sections jobs/pipeline.py runs and in
what order.  A stage job (jobs/embed.py, ...) reads its own section; a file
with no stage sections at all is taken as that one stage's options.

Inside a section:
  key: value     -> --key value   (`_` and `-` both spell the option: batch_tokens -> --batch-tokens)
  key: true      -> --key         (a bare flag)
  key: false|null   option left out
  args: [a, b]   -> positional arguments, first (e.g. `prepare: {args: [prism], ...}`)
  overrides: {k: v}  -> positional k=v after the options (`mrm train` config overrides;
                        nested mappings become dotted keys: {inner: {steps: 3}} -> inner.steps=3)

Options are not checked here: the `mrm` parser is the one authority, so a
misspelt key fails the job with the stage's own usage message.  All the
logic lives in mrm_ray; this file only translates.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

# `python jobs/x.py` puts jobs/ (not the repository root) on sys.path.  Put the
# root first so that the mrm_ray shipped with `ray job submit --working-dir .`
# is the one imported, not an older copy installed in the cluster's image.
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

from mrm_ray.cli import COMMANDS  # noqa: E402  (needs ROOT on sys.path)

STAGES = tuple(COMMANDS)  # every `mrm` command, in pipeline order
RESERVED = ("args", "overrides")


class ConfigError(ValueError):
    """A job config that cannot be turned into an argv; the message is one line."""


def load_config(path: str | os.PathLike) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a job config must be a YAML mapping, got {type(cfg).__name__}")
    return cfg


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """Apply `key=value` overrides in place; dotted keys descend (train.overrides.lr=0.01).

    The value is parsed as YAML, so numbers, booleans and null keep their type.
    """
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if node.get(p) is None:  # absent, or an empty section (`demo:`)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {p!r} is not a mapping")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return cfg


def stage_section(cfg: dict, stage: str) -> dict:
    """The options of one stage: its section of a chain file, or the whole flat file."""
    if stage in cfg:
        section = cfg[stage]
        if section is None:
            return {}
        if not isinstance(section, dict):
            raise ConfigError(f"section {stage!r} must be a mapping of options")
        return section
    present = [s for s in STAGES if s in cfg]
    if present:
        raise ConfigError(f"config has no {stage!r} section (it has: {', '.join(present)})")
    return {k: v for k, v in cfg.items() if k != "stages"}


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _override_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)


def to_argv(stage: str, options: dict) -> list[str]:
    """`mrm` argv for one stage: [stage, *positionals, *--options, *key=value overrides]."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of: {', '.join(STAGES)}")
    argv = [stage]
    args = options.get("args") or []
    if not isinstance(args, list):
        raise ConfigError(f"{stage}.args must be a list of positional arguments")
    argv += [str(a) for a in args]
    for key, value in options.items():
        if key in RESERVED or value is None or value is False:
            continue
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{stage}.{key}: an option takes one scalar value, got {type(value).__name__}")
        flag = "--" + str(key).replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    overrides = options.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{stage}.overrides must be a mapping of key: value")
    argv += [f"{k}={_override_value(v)}" for k, v in _flatten(overrides)]
    return argv


def job_parser(doc: str | None, config_required: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=config_required, metavar="YAML",
                   help="job config (see jobs/configs/); a chain file or one stage's options")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable; dotted keys descend, value parsed as YAML)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the mrm command line(s) this job would run, then exit without starting Ray")
    return p


def stage_argv(stage: str, config: str | os.PathLike, sets: list[str]) -> list[str]:
    """Config file + --set overrides -> the argv of `mrm <stage>` (what a stage job runs).

    --set keys are relative to the stage's section: `--set out=...`, `--set overrides.epochs=5`.
    """
    section = dict(stage_section(load_config(config), stage))
    return to_argv(stage, apply_sets(section, sets))


def chain_argvs(cfg: dict, stages: list[str] | None = None) -> list[list[str]]:
    """The argvs of a whole chain: `stages` (default: the file's `stages:` list, else
    every stage section present, in pipeline order)."""
    if stages is None:
        stages = cfg.get("stages") or [s for s in STAGES if s in cfg]
    if not stages:
        raise ConfigError("nothing to run: no stage sections and no `stages:` list")
    for s in stages:
        if s not in cfg:
            raise ConfigError(f"stage {s!r} is listed but the config has no {s!r} section")
    return [to_argv(s, stage_section(cfg, s)) for s in stages]


def show(argv: list[str]) -> str:
    return shlex.join(["mrm", *argv])


def init_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS is set), else start a local one.

    Call only from a job's `__main__` block.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        ray.init()


def run_mrm(argv: list[str]) -> int:
    """Run one `mrm` command in this process (the job's driver) and return its exit status."""
    from mrm_ray.cli import main

    print(f"+ {show(argv)}", flush=True)
    return main(argv)


def parse_job_args(stage: str, doc: str | None, argv: list[str] | None = None) -> list[str]:
    """A stage job's command line -> the `mrm <stage>` argv to run.

    Exits here on --help, on --dry-run (after printing the command) and on a
    config mistake (one line on stderr, status 2).
    """
    args = job_parser(doc).parse_args(argv)
    try:
        mrm_argv = stage_argv(stage, args.config, args.sets)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        fail(str(e).splitlines()[0])
    if args.dry_run:
        print(show(mrm_argv))
        sys.exit(0)
    return mrm_argv


def fail(msg: str) -> None:
    """A config mistake: one line on stderr, exit status 2 (as `mrm` does for bad input)."""
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    sys.exit(2)
