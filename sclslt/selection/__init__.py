"""Pair Selection: which clips form each stage-1 global batch.

- `schedules` the curriculum schedules (the quantile of Delta vs alpha), registered by name
- `planner`  the reference table (early/late embeddings) and the curriculum planner (docs/paper.md)
- `batches`  a stage's global batches each epoch (seeded shuffle, or planned: ps / self mode) and each rank's
             stream of its slice
"""
