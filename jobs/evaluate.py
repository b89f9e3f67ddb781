"""`mrm evaluate` as a Ray job: adapt every user on its train pairs, score its test pairs.

Reads the `evaluate:` section of a job config (run, embeddings, out: the
metrics JSON, default <run>/metrics.json); the stage itself is
mrm_ray.evaluate.  Submit from the repository root:

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/prism.yaml

    # evaluate another run (keys are relative to the evaluate: section)
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/prism.yaml \\
        --set run=s3://YOUR-BUCKET/mrm/prism/runs/seed1 --set out=null

Run locally on a Ray of its own:   python jobs/evaluate.py --config jobs/configs/cpu-small.yaml
Print the command, run nothing:    python jobs/evaluate.py --config jobs/configs/prism.yaml --dry-run
"""
import sys

from _common import init_ray, parse_job_args, run_mrm

if __name__ == "__main__":
    argv = parse_job_args("evaluate", __doc__)  # exits on --help, --dry-run or a bad config
    init_ray()
    sys.exit(run_mrm(argv))
