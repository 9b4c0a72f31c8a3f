"""The evolver loop: iterations of trials that Optuna and the diagnoses propose.

- `study`: settings (`cfg.loop`), RDB storage with heartbeats, sampler, pruner, atomic claims.
- `space`: the search space (`conf/search/`) and its adaptation by findings.
- `proposals`: an iteration's enqueued trials, from the incumbent's diagnosis.
- `state`: loop state kept in the study; `outcomes`: a finished job's records as trial attrs.
- `runner`: the loop itself; the Hydra sweeper (`hydra/sweeper=evolver`) drives it.
- `job`: the job side (pruning callback); `status`: `evolver status`.
"""
