"""An exported decoder turned into pixels: from image embeddings (unCLIP), or from captions, read
by its CLIP's text transformer (``text_tokens``) or by its own (``caption_transformer``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from ..diffusion import Sampler, sample_loop
from .caption_tokens import CaptionClip, token_condition
from .caption_transformer import (
    CaptionConditionedUNet,
    CaptionTransformer,
    caption_ids,
    pack_caption_ids,
)
from .decoder import DecoderTask, decoder_prediction, to_uint8
from .diffusion_task import ExportedDiffusion, InfoValue


class DecoderSampler(CaptionClip, ExportedDiffusion):
    """An exported decoder, ready to turn image embeddings into pixels."""

    TASK = DecoderTask
    MODEL_CLASS = UNet2DConditionModel
    image_size = InfoValue(int)
    text_conditioning = InfoValue(bool, False)

    def __init__(
        self,
        model: Any,
        scheduler_config: dict[str, Any],
        info: dict[str, Any],
        device: str,
        text_encoder: CaptionTransformer | None = None,
    ) -> None:
        super().__init__(model, scheduler_config, info, device)
        if (text_encoder is None) == (info.get("condition") == "caption_transformer"):
            raise ValueError(
                "a decoder of condition 'caption_transformer' is loaded with its text encoder, "
                "and no other decoder is"
            )
        self.text_encoder = None if text_encoder is None else text_encoder.to(device).eval()

    @classmethod
    def load_parts(cls, export_dir: str, info: dict[str, Any]) -> dict[str, Any]:
        folder = info.get("text_encoder")
        if not folder:
            return {}
        path = os.path.join(export_dir, folder)
        return {"text_encoder": CaptionTransformer.from_pretrained(path, low_cpu_mem_usage=False)}

    @property
    def reads_captions(self) -> bool:
        """Whether the decoder is conditioned on the caption alone (either kind; no prior)."""
        return self.text_tokens or self.text_encoder is not None

    @property
    def text_context(self) -> int:
        """Caption tokens the decoder reads (0: it reads image embeddings, from a prior)."""
        return int(self.info.get("text_context_length", 0)) if self.text_tokens else 0

    @property
    def text_tokens(self) -> bool:
        """Whether the decoder is conditioned on the caption's tokens alone (no prior)."""
        return self.info.get("condition") == "text_tokens"

    def caption_condition(
        self,
        text_emb: torch.Tensor | None,
        captions: Sequence[str] | None,
        token_encodings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The packed token condition of N captions (text embeddings computed when not given)."""
        if captions is None and (text_emb is None or token_encodings is None):
            raise ValueError(
                "this decoder is conditioned on captions' tokens: pass captions= (encoded with "
                "the export's CLIP), or text_emb= with token_encodings="
            )
        if text_emb is None:
            from unclip.datasets.clip import encode_texts

            text_emb = torch.from_numpy(encode_texts(self.caption_clip(), list(captions)))
        text = torch.as_tensor(text_emb, dtype=torch.float32)
        if text.ndim != 2 or text.shape[1] != self.dim:
            raise ValueError(f"caption embeddings must be [N, {self.dim}], got {list(text.shape)}")
        clip = self.caption_clip() if token_encodings is None else None
        return token_condition(text, self.text_context, captions, token_encodings, clip)

    @torch.no_grad()
    def sample(
        self,
        image_emb: torch.Tensor | None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: Sampler = "ddim",
        text_emb: torch.Tensor | None = None,
        *,
        captions: Sequence[str] | None = None,
        token_encodings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for image embeddings [N, D] (and caption embeddings [N, D]).

        A text-conditioned decoder given no caption embeddings decodes with the null caption. A
        decoder conditioned on caption tokens ignores ``image_emb`` and reads ``captions`` (or
        ``text_emb`` with ``token_encodings`` = (encodings [N, L, D], mask [N, L])); one with its
        own caption transformer reads ``captions`` alone.
        """
        model = self.model
        if self.text_tokens:
            emb = self.caption_condition(text_emb, captions, token_encodings)
        elif self.text_encoder is not None:
            if captions is None:
                raise ValueError(
                    "this decoder reads captions with its own text encoder: pass captions="
                )
            emb = pack_caption_ids(*caption_ids(captions, self.text_encoder.config.context_length))
            model = CaptionConditionedUNet(self.model, self.text_encoder)
        else:
            emb = torch.as_tensor(image_emb, dtype=torch.float32)
            if emb.ndim != 2 or emb.shape[1] != self.dim:
                raise ValueError(f"image embeddings must be [N, {self.dim}], got {list(emb.shape)}")
        if self.text_conditioning:
            text = torch.zeros_like(emb) if text_emb is None else torch.as_tensor(text_emb)
            if text.shape != emb.shape:
                raise ValueError(
                    f"caption embeddings must be {list(emb.shape)}, got {list(text.shape)}"
                )
            emb = torch.cat([emb, text.float()], dim=1)
        steps = self.sample_steps(steps)
        scale = self.guidance_scale(guidance_scale)
        emb = emb.to(self.device, self.dtype if emb.is_floating_point() else emb.dtype)
        learned = bool(self.info.get("learned_variance", False))
        keep = 6 if learned and sampler == "ddpm" else 3  # DDIM (η = 0) has no use for Σ_θ
        x = sample_loop(
            lambda x, t, c: decoder_prediction(
                model, x, t, c, self.text_conditioning, self.text_context
            )[:, :keep],
            (emb.shape[0], 3, self.image_size, self.image_size),
            emb,
            self.scheduler_config,
            steps,
            scale,
            seed,
            sampler,
            guided_channels=3 if keep == 6 else None,
            dtype=self.dtype,
        )
        return to_uint8(x)


def load_decoder(export_dir: str, device: str = "cpu") -> DecoderSampler:
    """Load an exported decoder (``train_decoder(...).export_dir``)."""
    return DecoderSampler.load(export_dir, device)
