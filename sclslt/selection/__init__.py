"""Pair Selection: which clips form each stage-1 global batch.

- `planner`  the reference table (early/late embeddings) and the curriculum planner (PAPER.md)
- `batches`  a stage's batch source each epoch: shuffled stream, or planned batches (ps / self mode)
"""
