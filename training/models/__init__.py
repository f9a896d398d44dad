"""The models: the diffusion prior, the decoder, the upsamplers, the bootstrap CLIP, and the base they share."""
