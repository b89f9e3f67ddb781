"""What every job entrypoint in jobs/ shares: a YAML config becomes calls of the `mrm` stages.

A job config is a YAML mapping.  A chain file (jobs/configs/*.yaml) holds one
section per stage, named like the `mrm` command (`embed:`, `train:`, ...), plus
an optional `stages:` list saying which sections jobs/pipeline.py runs and in
what order.  A stage job (jobs/embed.py, ...) reads its own section; a file
with no stage sections at all is taken as that one stage's options.

Inside a section the keys are the command's long options (`batch_tokens` or
`batch-tokens` for --batch-tokens), its positionals by name (`dataset: prism`
for `mrm prepare prism`), and, for train and compare, `overrides:` as a
mapping ({inner: {steps: 3}} is inner.steps=3).  They are checked by the
command's own option definitions (mrm_ray.cli.options): a misspelt key fails
the job with one line.  --set KEY=VALUE uses the one override parser of
mrm_ray.config.  All the logic lives in mrm_ray; this file only translates.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ (not the repository root) on sys.path.  Put the
# root first so that the mrm_ray shipped with `ray job submit --working-dir .`
# is the one imported, not an older copy installed in the cluster's image.
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

from mrm_ray import cli  # noqa: E402  (needs ROOT on sys.path)
from mrm_ray import config as config_mod  # noqa: E402
from mrm_ray.errors import UserError  # noqa: E402

STAGES = tuple(cli.COMMANDS)  # every `mrm` command, in pipeline order


def load_config(path: str | os.PathLike) -> dict:
    import yaml
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise UserError(f"cannot read job config {path}: {e.strerror or e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a job config must be a YAML mapping, got {type(cfg).__name__}")
    return cfg


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """--set key=value overrides (dotted keys descend: train.overrides.seed=1; values read as YAML)."""
    return config_mod.merge(cfg, config_mod.parse_overrides(sets))


def stage_section(cfg: dict, stage: str) -> dict:
    """The options of one stage: its section of a chain file, or the whole flat file."""
    if stage in cfg:
        section = cfg[stage]
        if section is None:
            return {}
        if not isinstance(section, dict):
            raise UserError(f"section {stage!r} must be a mapping of options")
        return section
    present = [s for s in STAGES if s in cfg]
    if present:
        raise UserError(f"config has no {stage!r} section (it has: {', '.join(present)})")
    return {k: v for k, v in cfg.items() if k != "stages"}


def chain(cfg: dict, stages: list[str] | None = None) -> list[tuple[str, argparse.Namespace]]:
    """The checked options of every stage of a chain: `stages` (default: the file's `stages:` list, else
    every stage section present, in pipeline order).  Everything is checked before anything runs."""
    if stages is None:
        stages = cfg.get("stages") or [s for s in STAGES if s in cfg]
    if not stages:
        raise UserError("nothing to run: no stage sections and no `stages:` list")
    for s in stages:
        if s not in STAGES:
            raise UserError(f"unknown stage {s!r}; one of: {', '.join(STAGES)}")
        if s not in cfg:
            raise UserError(f"stage {s!r} is listed but the config has no {s!r} section")
    return [(s, cli.options(s, stage_section(cfg, s))) for s in stages]


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


def run_stages(steps: list[tuple[str, argparse.Namespace]]) -> int:
    """Run stages in this process (the job's driver), stopping at the first that fails; its exit status.

    Each Ray stage joins the cluster the job was submitted to (RAY_ADDRESS), else starts a local one.
    """
    cli.setup_logging()
    for name, o in steps:
        print(f"+ {cli.command_line(name, o)}", flush=True)
        status = cli.run_command(name, o)
        if status:
            if len(steps) > 1:
                print(f"pipeline: stage {name!r} failed (exit status {status}); later stages not run",
                      file=sys.stderr)
            return status
    return 0


def stage_job(stage: str, doc: str | None, argv: list[str] | None = None) -> int:
    """A stage job: its command line -> the checked options of `mrm <stage>` -> run it.

    Exits on --help; returns 0 after printing the command on --dry-run; 2 on a config mistake.
    """
    args = job_parser(doc).parse_args(argv)
    try:
        steps = [(stage, cli.options(stage, apply_sets(stage_section(load_config(args.config), stage), args.sets)))]
    except UserError as e:
        return fail(str(e))
    if args.dry_run:
        print(cli.command_line(stage, steps[0][1]))
        return 0
    return run_stages(steps)


def fail(msg: str) -> int:
    """A config mistake: one line on stderr, exit status 2 (as `mrm` does for bad input)."""
    print(f"{Path(sys.argv[0]).name}: error: {msg.splitlines()[0] if msg else 'bad config'}", file=sys.stderr)
    return 2
