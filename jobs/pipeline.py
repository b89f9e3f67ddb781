"""A whole chain as one Ray job: the stage sections of one config, run in order.

With --config, runs the file's `stages:` list (default: every stage section it
has, in pipeline order: synth, prepare, embed, train, evaluate, score, ...),
each as `mrm <stage> ...` in this one driver, and stops at the first stage
that fails.  Without --config it runs the demo chain, `mrm demo`.  Submit from
the repository root:

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/prism.yaml

    # only some stages, e.g. after embeddings exist or to resume a failed train stage
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/prism.yaml \\
        --stages train,evaluate

    # --set keys start at the top of the file here: <stage>.<key>
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/reddit.yaml \\
        --set train.overrides.seed=1 --set train.out=s3://YOUR-BUCKET/mrm/reddit/runs/seed1

    # the demo chain (local files, small offline model)
    ray job submit --working-dir . -- python jobs/pipeline.py

Run locally on a Ray of its own:   python jobs/pipeline.py --config jobs/configs/cpu-small.yaml
Print the commands, run nothing:   python jobs/pipeline.py --config jobs/configs/prism.yaml --dry-run
"""
import sys

import yaml
from _common import (ConfigError, apply_sets, chain_argvs, fail, init_ray, job_parser, load_config,
                     run_mrm, show)

DEMO = {"demo": {}}  # no --config: `mrm demo` with its own defaults (--set demo.workdir=DIR to move it)


def parse_args(argv: list[str] | None = None) -> list[list[str]]:
    """Command line -> the `mrm` argvs to run, in order (exits on --help, --dry-run or a bad config)."""
    p = job_parser(__doc__, config_required=False)
    p.add_argument("--stages", metavar="A,B,...",
                   help="comma-separated stages to run, in this order (default: the config's `stages:` list)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else dict(DEMO)
        apply_sets(cfg, args.sets)
        argvs = chain_argvs(cfg, [s.strip() for s in args.stages.split(",")] if args.stages else None)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        fail(str(e).splitlines()[0])
    if args.dry_run:
        print("\n".join(show(a) for a in argvs))
        sys.exit(0)
    return argvs


if __name__ == "__main__":
    argvs = parse_args()
    init_ray()
    for argv in argvs:
        status = run_mrm(argv)
        if status:
            print(f"pipeline: stage {argv[0]!r} failed (exit status {status}); later stages not run",
                  file=sys.stderr)
            sys.exit(status)
    sys.exit(0)
