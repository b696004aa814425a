"""Pair Selection: which clips form each stage-1 global batch.

- `schedules`    the curriculum schedules (the quantile of Delta vs alpha), registered by name
- `scoring`      the reference table in memory (early/late embeddings) and Delta, the scoring maths on it
                 (docs/paper.md)
- `table`        the reference table's files: single, sharded, snapshots (each writer beside its reader)
- `separation`   `selection.separate_close`'s thresholds (likely false-negative pairs)
- `planner`      the curriculum planner: the paper's greedy over a pool, and its candidate ladder
- `batches`      a stage's global batches each epoch (seeded shuffle, or planned: ps / self mode) and each
                 rank's stream of its slice
"""
