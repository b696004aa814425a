"""Training: the loop and everything around it.

- `loop`       one training loop for both stages, and the run that chains them
- `context`    what all parts of a run share (config, distributed facts, directories), stage names, errors
- `engine`     the only module that imports deepspeed: distributed init, engine, checkpoints
- `signals`    preemption signals (SIGTERM / SIGUSR1) -> checkpoint at a step boundary
- `telemetry`  NVML GPU telemetry and the sampled step-time breakdown
- `ui`         progress, summaries, metrics CSV and TensorBoard on rank 0
"""
