"""The runtime floor: what every part of a run shares, below the selection, evaluation and training
floors and above the model and data (no module here imports selection, eval or train).

- `context`       what all parts of a run share (config, distributed facts, directories), stage names, errors
- `distributed`   joining and leaving a job: torch.distributed through DeepSpeed, Slurm, dead peers
- `engine`        the DeepSpeed engine the loop trains through, its config from the experiment's
- `checkpoints`   checkpoint files: publish, latest, weights-only loading, universal conversion, fp32 weights
- `checkpointer`  the checkpoint policy: when a stage saves, what a checkpoint is called, what is kept
- `rundir`        a run directory's paths, and reading a run back (config, tokenizer, the selected model)
- `signals`       preemption signals (SIGTERM / SIGUSR1) -> checkpoint at a step boundary
- `telemetry`     NVML GPU telemetry and the sampled step-time breakdown
- `syncs`         device-to-host reads counted (`HostReads`): what a step would make a GPU wait for
- `ui`            progress, summaries, metrics CSV and TensorBoard on rank 0

Only this floor imports deepspeed (`distributed`, `engine`, `checkpoints`).
"""
