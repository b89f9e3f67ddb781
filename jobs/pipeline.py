"""A whole chain as one Ray job: the stage sections of one config, run in order.

With --config, runs the file's `stages:` list (default: every stage section it
has, in pipeline order: synth, prepare, embed, train, evaluate, score, ...),
each as its `mrm <stage>` would in this one driver, and stops at the first
stage that fails.  Without --config it runs the demo chain, `mrm demo`.  Submit from
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

from _common import apply_sets, chain, fail, job_parser, load_config, run_stages

from mrm_ray import cli
from mrm_ray.errors import UserError

DEMO = {"demo": {}}  # no --config: `mrm demo` with its own defaults (--set demo.workdir=DIR to move it)


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__, config_required=False)
    p.add_argument("--stages", metavar="A,B,...",
                   help="comma-separated stages to run, in this order (default: the config's `stages:` list)")
    args = p.parse_args(argv)
    try:
        cfg = apply_sets(load_config(args.config) if args.config else dict(DEMO), args.sets)
        steps = chain(cfg, [s.strip() for s in args.stages.split(",")] if args.stages else None)
    except UserError as e:
        return fail(str(e))
    if args.dry_run:
        print("\n".join(cli.command_line(name, o) for name, o in steps))
        return 0
    return run_stages(steps)


if __name__ == "__main__":
    sys.exit(main())
