"""Infrastructure of a run, under the paper's path: processes and ranks (dist), signals, logs and timers, the
output directory and its checkpoints, the stop rules, the bookkeeping after each step, the step's diagnostics, the
hardened HTTP client of a served critic, and the results table. Nothing here is an equation of the paper."""
