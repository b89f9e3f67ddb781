"""The `mrm` console script: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`; this
file only routes to them (imported lazily, so `mrm --help` starts fast) and
turns user mistakes into one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mrm_ray.errors import UserError

# name -> (module, one-line help).  Order is the order of the pipeline.
COMMANDS = {
    "synth": ("mrm_ray.synth", "write a synthetic user population with known ground truth"),
    "prepare": ("mrm_ray.prepare", "convert PRISM or Reddit TL;DR files into the pairs table"),
    "embed": ("mrm_ray.embed", "embed preference pairs with a frozen reward model (Ray Data)"),
    "train": ("mrm_ray.train", "meta-train MRM (+RPO) on an embeddings table (Ray Train)"),
    "evaluate": ("mrm_ray.evaluate", "adapt every user on its train pairs, score its test pairs"),
    "score": ("mrm_ray.score", "bulk-score a user population's candidates (parallel Ray tasks over user partitions)"),
    "compare": ("mrm_ray.compare", "MRM, MRM+RPO and baselines on one split: table and plot"),
    "export-hf": ("mrm_ray.export", "write one user's reward model as a transformers checkpoint"),
    "demo": ("mrm_ray.demo", "the whole chain on the embedded defaults (local Ray, local files)"),
}

EXIT_USAGE = 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrm", description="Meta Reward Modeling at scale: personalized reward models for millions of users.",
        epilog="Run 'mrm COMMAND --help' for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_, add_help=False)  # listed, options not loaded
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Load only the chosen command's module: `mrm train --help` should not import transformers.
    only = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"mrm {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mrm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
