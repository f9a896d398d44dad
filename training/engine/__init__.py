"""The one trainer: Ray Train + DeepSpeed driver and worker loop, checkpoints, stream positions, run records."""
