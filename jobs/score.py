"""`mrm score` as a Ray job: bulk-score a user population's candidates with Ray tasks over user buckets.

Reads the `score:` section of a job config (run, support: the users' labelled
pairs as an embeddings table, candidates: user_id, candidate_id, emb, out);
the stage itself is mrm_ray.score.  Submit from the repository root:

    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/prism.yaml

    # score a new batch of candidates (keys are relative to the score: section)
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/prism.yaml \\
        --set candidates=s3://YOUR-BUCKET/mrm/prism/candidates/2026-01 \\
        --set out=s3://YOUR-BUCKET/mrm/prism/scores/2026-01

Print the command, run nothing:    python jobs/score.py --config jobs/configs/prism.yaml --dry-run
"""
import sys

from _common import stage_job

if __name__ == "__main__":
    sys.exit(stage_job("score", __doc__))  # --help, --dry-run and config mistakes are handled there
