"""Training: the top floor, the loop and the run that chains the stages.

- `stage`        the one training loop for both stages: `Stage` trains a stage to its end (or resumes it)
- `run`          the run that chains them: stage 1 -> stage 2 -> evaluation
- `accumulate`   a rank's share in micro-batches by gradient caching (the same update as one pass)
- `resume`       where a stage continues from: the intact checkpoint, the world size it was written at
- `verdict`      every rank's word on a step (finite loss, preemption) and the non-finite guard
- `schedule`     the learning-rate schedule and the seeds (pure functions of the position)
- `audit`        the audit trail `<stage>/batches.jsonl`
- `close_pairs`  a stage's close sentence pairs, the same on every rank
- `main`         `sclslt train` / `launch/train.py`: arguments, exit codes

The objective (forward, step loss, trainable parts) is the model floor's: `sclslt.model.objective`. What a
run shares (context, engine, checkpoints, signals, telemetry, ui) is the floor below: `sclslt.runtime`.
"""
