"""`mrm train` as a Ray job: meta-train MRM (+RPO) on an embeddings table with Ray Train.

Reads the `train:` section of a job config: embeddings, out (the run
directory), config (a training preset file) and `overrides:` (key: value
pairs: the config overrides on top of the preset).  The stage itself is
mrm_ray.train.  Submit from the repository root:

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/prism.yaml

    # one override on top of the preset (keys are relative to the train: section)
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/prism.yaml \\
        --set overrides.seed=1 --set out=s3://YOUR-BUCKET/mrm/prism/runs/seed1

A failed or interrupted run resumes from its latest checkpoint when submitted
again with the same `out` run directory.

Run locally on a Ray of its own:   python jobs/train.py --config jobs/configs/cpu-small.yaml
Print the command, run nothing:    python jobs/train.py --config jobs/configs/prism.yaml --dry-run
"""
import sys

from _common import stage_job

if __name__ == "__main__":
    sys.exit(stage_job("train", __doc__))  # --help, --dry-run and config mistakes are handled there
