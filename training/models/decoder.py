"""The diffusion decoder (CLIP image embedding → pixels) on diffusers' UNet2DConditionModel.

Conditioning as in Kandinsky 2.2, which is DALL·E 2's decoder conditioning: the image embedding
is projected and added to the timestep embedding (``addition_embed_type="image"``) and projected
to extra context tokens the cross-attention layers read (``encoder_hid_dim_type="image_proj"``).
Optionally (``text_conditioning``) the caption's CLIP text embedding joins it as in Kandinsky 2.1
(``addition_embed_type="text_image"``, ``encoder_hid_dim_type="text_image_proj"``): added to the
timestep embedding too, and one more context token. With ``adaptive_norm`` that embedding
scales and shifts each ResNet block's group norm (AdaGN, Dhariwal & Nichol 2021) instead of being
added to its activations. Trained with the MSE of the UNet's output
against ε (Ho et al. 2020, eq. 14; the default), x_0 or v (``prediction_type``), optionally
Min-SNR-γ weighted (``snr_gamma``), on the cosine schedule; the image embedding is dropped
(zeroed) with ``cond_drop_prob`` and the caption embedding, independently, with
``text_drop_prob`` (unCLIP sec. 2.1: 10% and 50%) for classifier-free guidance. With ``learned_variance`` the UNet also
outputs the interpolation v of its log-variance between β̃_t and β_t (diffusers'
``variance_type="learned_range"``), trained by the hybrid loss L_simple + λ·L_vlb (Nichol &
Dhariwal 2021, sec. 3.1).

With ``condition="text_tokens"`` the decoder reads the caption alone, as Imagen and GLIDE: the
frozen CLIP text transformer's token sequence (``caption_tokens``), projected to the
cross-attention width (``encoder_hid_dim_type="text_proj"``) and attended to by every attention
block, and the pooled text embedding projected and added to the timestep embedding
(``class_embed_type="projection"``); no image embedding and no prior. With
``condition="caption_transformer"`` the same two inputs come from a text transformer trained with
the UNet (``caption_transformer``, GLIDE's text side); the export then holds ``text_encoder/``
beside ``unet/``.

The condition a model function receives is one tensor: the image embedding [N, D], with text
conditioning [image ‖ text] [N, 2D], with text tokens the packed [text | tokens | mask] row, or
with the caption transformer the integer [token ids | mask] row, so the shared guidance's null
condition (zeros) drops all of it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns, ShardSource

from ..config import DecoderConfig
from ..diffusion import diffusion_mse, drop_condition, noised, vlb_term
from ..engine.fit_result import export_info_file
from .caption_tokens import (
    CaptionTokens,
    pack_condition,
    unpack_condition,
)
from .caption_transformer import (
    CaptionConditionedUNet,
    CaptionTransformer,
    caption_ids,
    pack_caption_ids,
    unpack_caption_ids,
)
from .diffusion_task import PixelDiffusionTask

MODEL_KIND = "decoder"
INFO_FILE = export_info_file(MODEL_KIND)
TOKENS_KEY = "decoder.condition"
TEXT_ENCODER_FOLDER = "text_encoder"  # in the export, beside unet/, with a caption transformer


def build_decoder(cfg: DecoderConfig, dim: int) -> UNet2DConditionModel:
    """An untrained UNet for ``cfg.image_size`` pixels, conditioned on D=``dim`` image embeddings."""
    channels = list(cfg.block_out_channels)
    bad = [c for c in channels if c % cfg.attention_head_dim]
    if bad:
        raise ValueError(
            f"decoder.block_out_channels {channels}: every entry must be divisible by "
            f"attention_head_dim={cfg.attention_head_dim}"
        )
    if cfg.image_size % 2 ** (len(channels) - 1):
        raise ValueError(
            f"decoder.image_size {cfg.image_size} must be divisible by 2^{len(channels) - 1} "
            f"({len(channels)} resolution levels)"
        )
    n = len(channels)
    if cfg.attention_levels > n:
        raise ValueError(
            f"decoder.attention_levels {cfg.attention_levels} exceeds the {n} resolution levels "
            f"of block_out_channels {channels}"
        )
    plain = n - cfg.attention_levels
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * cfg.attention_levels
    if cfg.condition in ("text_tokens", "caption_transformer"):
        if cfg.condition == "caption_transformer":
            dim = cfg.text_encoder_width  # the token states are the caption transformer's
        conditioning = {
            "cross_attention_dim": channels[-1],
            "encoder_hid_dim_type": "text_proj",  # token encodings → cross-attention width
            "class_embed_type": "projection",  # pooled text embedding → timestep embedding
            "projection_class_embeddings_input_dim": dim,
        }
    elif cfg.text_conditioning:
        # diffusers sizes Kandinsky 2.1's TextImageProjection / TextImageTimeEmbedding by
        # cross_attention_dim for the image and pooled-text inputs: both are CLIP embeddings here.
        conditioning = {
            "cross_attention_dim": dim,
            "encoder_hid_dim_type": "text_image_proj",
            "addition_embed_type": "text_image",
        }
    else:
        conditioning = {
            "cross_attention_dim": channels[-1],
            "encoder_hid_dim_type": "image_proj",
            "addition_embed_type": "image",
        }
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=6 if cfg.learned_variance else 3,  # ε ‖ v
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=tuple(channels),
        layers_per_block=cfg.layers_per_block,
        # diffusers reads `attention_head_dim` as the number of heads per block (a known
        # misnomer): pass heads so each head really has cfg.attention_head_dim channels.
        attention_head_dim=tuple(c // cfg.attention_head_dim for c in channels),
        norm_num_groups=min(32, math.gcd(*channels)),
        resnet_time_scale_shift="scale_shift" if cfg.adaptive_norm else "default",
        encoder_hid_dim=dim,
        **conditioning,
    )


def build_caption_transformer(cfg: DecoderConfig) -> CaptionTransformer:
    """The untrained text transformer of ``decoder.condition: caption_transformer``."""
    return CaptionTransformer(
        context_length=cfg.text_encoder_context,
        width=cfg.text_encoder_width,
        layers=cfg.text_encoder_layers,
        heads=cfg.text_encoder_heads,
    )


def decoder_prediction(
    model: Any,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    with_text: bool = False,
    text_context: int = 0,
) -> torch.Tensor:
    """The UNet's prediction (ε, x_0 or v) for noised images ``x_t`` given the condition.

    ``with_text``: the model is text-conditioned and ``cond`` is [image ‖ text];
    ``text_context`` > 0: the model reads that many caption tokens and ``cond`` is a packed
    [text | tokens | mask] row (both passed in, not read from ``model.config``: under the
    trainer ``model`` is a DeepSpeed engine); an integer ``cond`` is a caption transformer's
    [token ids | mask] row and ``model`` a :class:`CaptionConditionedUNet`.
    """
    if not cond.is_floating_point():
        return model(x_t, t, *unpack_caption_ids(cond))
    if text_context:
        dim = (cond.shape[1] - text_context) // (text_context + 1)
        text, tokens, mask = unpack_condition(cond, text_context, dim)
        out = model(
            x_t, t, encoder_hidden_states=tokens, class_labels=text, encoder_attention_mask=mask
        )
        return out.sample
    if not with_text:
        out = model(x_t, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": cond})
        return out.sample
    image_emb, text_emb = cond.chunk(2, dim=1)
    out = model(
        x_t,
        t,
        encoder_hidden_states=text_emb[:, None, :],  # one context token (the pooled caption)
        added_cond_kwargs={"image_embeds": image_emb, "text_embeds": text_emb},
    )
    return out.sample


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass(kw_only=True)
class DecoderTask(CaptionTokens, PixelDiffusionTask):
    """The decoder as a :class:`~unclip.training.engine.trainer.TrainTask` over one dataset version."""

    MODEL_KIND: ClassVar[str] = MODEL_KIND
    TOKENS_KEY: ClassVar[str] = TOKENS_KEY

    cfg: DecoderConfig

    @classmethod
    def from_manifest(
        cls, layout: StorageLayout, version: str, cfg: DecoderConfig, holdout_fraction: float
    ) -> DecoderTask:
        task = super().from_manifest(layout, version, cfg, holdout_fraction)
        if cfg.condition == "text_tokens":  # the caption transformer needs no CLIP
            task.attach_clip_record(layout, task.clip_id)
        return task

    @property
    def uses_text_tokens(self) -> bool:
        return self.cfg.condition == "text_tokens"

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.condition == "caption_transformer"

    def build_model(self) -> UNet2DConditionModel | CaptionConditionedUNet:
        unet = build_decoder(self.cfg, self.dim)
        if self.trains_text_encoder:
            return CaptionConditionedUNet(unet, build_caption_transformer(self.cfg))
        return unet

    def save_model(self, model: torch.nn.Module, directory: str) -> None:
        if not self.trains_text_encoder:
            return super().save_model(model, directory)
        model.unet.save_pretrained(os.path.join(directory, self.SUBFOLDER))
        model.text_encoder.save_pretrained(os.path.join(directory, TEXT_ENCODER_FOLDER))

    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        from unclip.datasets.stream_sources import ImagePairSource

        return ImagePairSource(
            self.layout, manifest, "train", self.holdout_fraction, image_size=self.cfg.image_size
        )

    def batch(self, columns: Columns) -> dict[str, torch.Tensor]:
        images, image_emb = columns["image"], columns["image_embedding"]
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"decoder images must be [N, {size}, {size}, 3], got {images.shape}")
        if self.trains_text_encoder:  # captions alone: no embeddings read
            ids, mask = caption_ids(list(columns["caption"]), self.cfg.text_encoder_context)
            return {"images": to_unit_range(images), "caption_ids": ids, "caption_mask": mask}
        if image_emb.shape != (len(images), self.dim):
            raise ValueError(
                f"image embeddings must be [{len(images)}, {self.dim}], got {image_emb.shape}"
            )
        out = {
            "images": to_unit_range(images),
            "image_emb": torch.from_numpy(np.ascontiguousarray(image_emb, np.float32)),
        }
        if self.cfg.text_conditioning or self.uses_text_tokens:
            text_emb = columns.get("text_embedding")
            if text_emb is None or text_emb.shape != image_emb.shape:
                got = None if text_emb is None else text_emb.shape
                raise ValueError(
                    f"a decoder conditioned on captions needs caption embeddings "
                    f"[{len(images)}, {self.dim}], got {got}"
                )
            out["text_emb"] = torch.from_numpy(np.ascontiguousarray(text_emb, np.float32))
        if self.uses_text_tokens:
            enc, mask = self.token_encodings(list(columns["caption"]))
            out["tokens"], out["token_mask"] = torch.from_numpy(enc), torch.from_numpy(mask)
        return out

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The condition rows of a batch, dropped for guidance (each part with its own rate)."""
        if self.trains_text_encoder:
            packed = pack_caption_ids(batch["caption_ids"], batch["caption_mask"])
            return drop_condition(packed, self.cfg.cond_drop_prob)
        if self.uses_text_tokens:
            packed = pack_condition(batch["text_emb"], batch["tokens"], batch["token_mask"])
            return drop_condition(packed, self.cfg.cond_drop_prob)
        cond = drop_condition(batch["image_emb"], self.cfg.cond_drop_prob)
        if self.cfg.text_conditioning:
            text = drop_condition(batch["text_emb"], self.cfg.text_drop_prob)
            cond = torch.cat([cond, text], dim=1)
        return cond

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # L_simple = ‖ε − ε_θ(x_t, t, z_i, y)‖²  (Ho et al. 2020, eq. 14), or the same against
        # x_0 or v; z_i and the caption embedding y dropped independently for guidance (or,
        # conditioned on tokens, the caption's tokens and embedding dropped together).
        sched, x0 = self.train_scheduler(), batch["images"]
        x_t, noise, t = noised(sched, x0)
        cond = self.condition(batch)
        pred = decoder_prediction(
            model, x_t, t, cond, self.cfg.text_conditioning, self.text_context
        ).float()
        if not self.cfg.learned_variance:
            return diffusion_mse(sched, pred, x0, noise, t, self.cfg.snr_gamma), {}
        # L_hybrid = L_simple + λ · L_vlb  (Nichol & Dhariwal 2021, eq. 16); L_vlb only trains Σ_θ
        eps, v = pred.chunk(2, dim=1)  # the config allows learned variance with ε only
        simple = diffusion_mse(sched, eps, x0, noise, t, self.cfg.snr_gamma)
        vlb = vlb_term(sched, x0.float(), x_t.float(), t, eps, v)
        vlb = vlb.mean() * sched.config.num_train_timesteps
        loss = simple + self.cfg.vlb_weight * vlb
        return loss, {"loss_simple": float(simple.detach()), "loss_vlb": float(vlb.detach())}

    def scheduler(self) -> DDPMScheduler:
        sched = super().scheduler()
        if self.cfg.learned_variance:  # the export's DDPM sampler then uses Σ_θ
            sched = DDPMScheduler.from_config(sched.config, variance_type="learned_range")
        return sched

    def export_info(self) -> dict[str, Any]:
        return {
            "image_size": self.cfg.image_size,
            "text_conditioning": self.cfg.text_conditioning,
            "learned_variance": self.cfg.learned_variance,
            "condition": self.cfg.condition,
            **self.token_export_info(),
            **({"text_encoder": TEXT_ENCODER_FOLDER} if self.trains_text_encoder else {}),
        }


# Train (or resume, or skip when done) on a dataset version; export to ``run_dir/export``.
train_decoder = DecoderTask.train
