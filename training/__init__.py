"""unclip.training: models, diffusion, the one Ray Train + DeepSpeed trainer, evaluation."""
