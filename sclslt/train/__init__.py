"""Training: the top floor, the loop and the run that chains the stages.

- `loop`   one training loop for both stages, and the run that chains them (stage 1 -> stage 2 -> evaluation)
- `main`   `sclslt train` / `launch/train.py`: arguments, exit codes

What a run shares (context, engine, checkpoints, signals, telemetry, ui) is the floor below:
`sclslt.runtime`.
"""
