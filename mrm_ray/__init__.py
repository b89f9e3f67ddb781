"""mrm-ray: Meta Reward Modeling (personalized reward models) at scale on Ray.

Stages (one module each): synth / prepare -> embed -> train -> evaluate / score / export.
The math (model, adapt, rpo, metrics, tasks, meta) is plain torch; `mrm_ray.api` is the
Python entry point for using a trained run; `mrm` (mrm_ray.cli) is the command line.
"""
__version__ = "0.1.0"
