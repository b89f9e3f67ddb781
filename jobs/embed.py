"""`mrm embed` as a Ray job: embed every preference pair once with a frozen reward model.

Reads the `embed:` section of a job config (pairs, out, model, batch_tokens,
max_length); the stage itself is mrm_ray.embed.  Submit from the repository
root to a running cluster (cluster/OPERATIONS.md says how to reach one):

    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/prism.yaml

    # change a key without editing the file (keys are relative to the embed: section)
    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/prism.yaml \\
        --set out=s3://YOUR-BUCKET/mrm/prism/embeddings-try2 --set batch_tokens=65536

Run locally on a Ray of its own:   python jobs/embed.py --config jobs/configs/prism.yaml
Print the command, run nothing:    python jobs/embed.py --config jobs/configs/prism.yaml --dry-run
"""
import sys

from _common import stage_job

if __name__ == "__main__":
    sys.exit(stage_job("embed", __doc__))  # --help, --dry-run and config mistakes are handled there
