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

from _common import stage_job

if __name__ == "__main__":
    sys.exit(stage_job("evaluate", __doc__))  # --help, --dry-run and config mistakes are handled there
