"""What runs the stages of tasks/: one stage's spec, CLI and atomic output (stage.py), its ranks
(ranks.py), its run records (records.py) and the runs they tell (runs.py), params.yaml rendering
(params.py), the cache check before a stage reads DVC-restored bytes (cache_check.py), and the
exported train_gpt.py's main (submission.py)."""
