"""`mrm finetune` as a Ray job: fine-tune the backbone for personalization on Ray Train with DeepSpeed.

Reads the `finetune:` section of a job config: pairs, out (the fine-tuning
directory; the backbone goes to <out>/model), model, config (a YAML file of
fine-tuning keys) and `overrides:` (key: value pairs on top of it).  The stage
itself is mrm_ray.finetune.  Submit from the repository root:

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune-gpu.yaml

A failed or interrupted run continues from its latest checkpoint when submitted
again with the same `out`.

Print the command, run nothing:    python jobs/finetune.py --config jobs/configs/finetune-gpu.yaml --dry-run
"""
import sys

from _common import stage_job

if __name__ == "__main__":
    sys.exit(stage_job("finetune", __doc__))  # --help, --dry-run and config mistakes are handled there
