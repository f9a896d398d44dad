"""Inference over trained models: the diffusers pipeline and its open_clip component."""

from .clip_model import OpenClipModel
from .pipeline import UnclipPipeline

__all__ = ["OpenClipModel", "UnclipPipeline"]
