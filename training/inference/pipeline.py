"""``UnclipPipeline``: the trained cascade as one diffusers pipeline.

caption → CLIP text embedding → prior (k candidates, the one closest to the text kept) → CLIP
image embedding → decoder → upsampler, with unCLIP's two other uses of the image embedding:
variations of an image and interpolation between two captions (Ramesh et al. 2022, sec. 3).

The components are what the training exports hold — diffusers' ``PriorTransformer``,
``UNet2DConditionModel``, ``UNet2DModel`` and their ``DDPMScheduler`` configs — plus the CLIP as an
:class:`OpenClipModel` (saved in open_clip's own layout). Each stage's sampling defaults (steps,
guidance, k, image sizes, conditioning) are the export's info json, kept in ``model_index.json``
as ``prior_info`` / ``decoder_info`` / ``upsampler_info``; nothing reads unclip's YAML config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Unpack

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    PriorTransformer,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image

from unclip.datasets.clip import ClipBundle, encode_images, encode_texts

from ..models.caption_transformer import CaptionTransformer
from ..models.decoder_sampler import DecoderSampler, load_decoder
from ..models.prior_sampler import PriorSampler, load_prior
from ..models.upsampler import UpsamplerSampler, load_upsampler
from ..sampling import check_captions, check_cascade, check_clip, slerp
from .call_options import DecodeCall, DecodeOptions, row_batches
from .clip_model import OpenClipModel

PIPELINE_FILE = "unclip_pipeline.py"  # in a saved folder: where diffusers finds the class
PIPELINE_SHIM = (
    '"""UnclipPipeline for DiffusionPipeline.from_pretrained (needs the unclip package)."""\n\n'
    "from unclip.training.inference import UnclipPipeline\n\n"
    '__all__ = ["UnclipPipeline"]\n'
)


class UnclipPipeline(DiffusionPipeline):
    r"""Text to image with a DALL·E 2-style cascade trained by unclip.

    Args:
        decoder (`UNet2DConditionModel`): CLIP image embedding (and, if trained so, caption
            embedding) → pixels at ``decoder_info["image_size"]``.
        decoder_scheduler (`DDPMScheduler`): the decoder's training noise schedule.
        clip (`OpenClipModel`, *optional*): encodes captions and images; needed for text and
            variations, not for decoding given image embeddings.
        prior (`PriorTransformer`, *optional*): CLIP text embedding → CLIP image embedding.
        prior_scheduler (`DDPMScheduler`, *optional*): the prior's training noise schedule.
        upsampler (`UNet2DModel`, *optional*): low-res image → ``upsampler_info["output_size"]``.
        upsampler_scheduler (`DDPMScheduler`, *optional*): the upsampler's noise schedule.
        text_encoder (`CaptionTransformer`, *optional*): the text transformer a decoder of
            condition ``caption_transformer`` was trained with (GLIDE-style); such a decoder
            reads the captions through it and needs no prior.
        prior_info, decoder_info, upsampler_info (`dict`): each export's sampling defaults.
    """

    model_cpu_offload_seq = "clip->prior->text_encoder->decoder->upsampler"
    _optional_components = [
        "clip",
        "prior",
        "prior_scheduler",
        "upsampler",
        "upsampler_scheduler",
        "text_encoder",
    ]

    def __init__(
        self,
        decoder: UNet2DConditionModel,
        decoder_scheduler: DDPMScheduler,
        clip: OpenClipModel | None = None,
        prior: PriorTransformer | None = None,
        prior_scheduler: DDPMScheduler | None = None,
        upsampler: UNet2DModel | None = None,
        upsampler_scheduler: DDPMScheduler | None = None,
        text_encoder: CaptionTransformer | None = None,
        prior_info: dict[str, Any] | None = None,
        decoder_info: dict[str, Any] | None = None,
        upsampler_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (prior is None) != (prior_scheduler is None):
            raise ValueError("give the prior and its scheduler together")
        if (upsampler is None) != (upsampler_scheduler is None):
            raise ValueError("give the upsampler and its scheduler together")
        self.register_modules(
            clip=clip,
            prior=prior,
            prior_scheduler=prior_scheduler,
            decoder=decoder,
            decoder_scheduler=decoder_scheduler,
            upsampler=upsampler,
            upsampler_scheduler=upsampler_scheduler,
            text_encoder=text_encoder,
        )
        self.register_to_config(
            prior_info=dict(prior_info or {}),
            decoder_info=dict(decoder_info or {}),
            upsampler_info=dict(upsampler_info or {}),
        )
        check_cascade(self.decoder_sampler(), [u for u in [self.upsampler_sampler()] if u])
        if clip is not None:
            check_clip(self.clip_bundle(), prior=self.config.prior_info, decoder=decoder_info or {})

    @classmethod
    def from_exports(
        cls,
        decoder_export: str,
        clip: OpenClipModel | ClipBundle | None = None,
        prior_export: str | None = None,
        upsampler_exports: Sequence[str] = (),
    ) -> UnclipPipeline:
        """The pipeline of unclip training exports (``runs/{model}/{run}/export``), loaded once."""
        if len(upsampler_exports) > 1:
            raise ValueError(f"one upsampler stage is supported, got {len(upsampler_exports)}")
        if isinstance(clip, ClipBundle):
            clip = OpenClipModel.from_bundle(clip)
        decoder = load_decoder(decoder_export)
        parts: dict[str, Any] = {"clip": clip}
        if prior_export:
            prior = load_prior(prior_export)
            parts.update(
                prior=prior.model,
                prior_scheduler=DDPMScheduler.from_config(prior.scheduler_config),
                prior_info=prior.info,
            )
        if upsampler_exports:
            up = load_upsampler(upsampler_exports[0])
            parts.update(
                upsampler=up.model,
                upsampler_scheduler=DDPMScheduler.from_config(up.scheduler_config),
                upsampler_info=up.info,
            )
        return cls(
            decoder=decoder.model,
            decoder_scheduler=DDPMScheduler.from_config(decoder.scheduler_config),
            decoder_info=decoder.info,
            text_encoder=decoder.text_encoder,
            **parts,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' folder, plus the pipeline file a plain ``DiffusionPipeline`` user names.

        ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=f"{folder}/unclip_pipeline.py",
        trust_remote_code=True)`` loads it; ``UnclipPipeline.from_pretrained(folder)`` needs neither.
        """
        super().save_pretrained(save_directory, **kwargs)
        with open(os.path.join(os.fspath(save_directory), PIPELINE_FILE), "w") as f:
            f.write(PIPELINE_SHIM)

    # --- the stages as unclip's samplers (views of the components, no copies) ---------------
    def clip_bundle(self) -> ClipBundle:
        """The CLIP component as a ``ClipBundle``; a clear error when the pipeline has none."""
        if self.clip is None:
            raise ValueError("this pipeline has no CLIP: captions and images cannot be encoded")
        return self.clip.bundle()

    def prior_sampler(self) -> PriorSampler:
        """The prior with its scheduler and sampling defaults; needs the prior component."""
        if self.prior is None:
            raise ValueError("this pipeline has no prior: captions cannot become image embeddings")
        sampler = PriorSampler(
            self.prior,
            dict(self.prior_scheduler.config),
            dict(self.config.prior_info),
            str(self.prior.device),
        )
        if self.clip is not None:
            sampler.use_clip(self.clip_bundle())
        return sampler

    @property
    def decoder_reads_captions(self) -> bool:
        """Whether the decoder is conditioned on the caption alone (and needs no prior)."""
        return self.decoder_sampler().reads_captions

    def decoder_sampler(self) -> DecoderSampler:
        """The decoder with its scheduler and sampling defaults."""
        return DecoderSampler(
            self.decoder,
            dict(self.decoder_scheduler.config),
            dict(self.config.decoder_info),
            str(self.decoder.device),
            text_encoder=self.text_encoder,
        )

    def upsampler_sampler(self) -> UpsamplerSampler | None:
        """The upsampler stage, or None when the cascade ends at the decoder."""
        if self.upsampler is None:
            return None
        return UpsamplerSampler(
            self.upsampler,
            dict(self.upsampler_scheduler.config),
            dict(self.config.upsampler_info),
            str(self.upsampler.device),
        )

    # --- public entry points ------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        prior_num_inference_steps: int | None = None,
        prior_guidance_scale: float | None = None,
        prior_candidates: int | None = None,
        *,
        batch_size: int | None = None,
        **options: Unpack[DecodeOptions],
    ) -> ImagePipelineOutput | tuple:
        """``num_images_per_prompt`` images per prompt, prompt-major.

        Steps, guidance scales and the prior's candidate count k default to the exports'. The
        noise comes from ``seed`` (or one drawn from ``generator``; default 0): the same seed
        and ``batch_size`` give the same images on any device. ``batch_size`` bounds how many
        images run through the models at once (batch i uses seed + i). The decoding options
        are :class:`~unclip.training.inference.call_options.DecodeOptions`.
        """
        captions = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        call = DecodeCall.of("__call__", options, prior=prior_guidance_scale)
        bundle = self.clip_bundle()
        check_captions(captions, bundle)
        # A decoder of caption tokens reads the captions itself: no prior, no image embedding.
        prior = None if self.decoder_reads_captions else self.prior_sampler()
        text = torch.from_numpy(encode_texts(bundle, captions))
        text = text.repeat_interleave(num_images_per_prompt, dim=0)
        repeated = [c for c in captions for _ in range(num_images_per_prompt)]
        chunks = []
        for i, rows in enumerate(row_batches(len(repeated), batch_size)):
            image_emb = None
            if prior is not None:
                image_emb = prior.sample(
                    text[rows],
                    steps=prior_num_inference_steps,
                    guidance_scale=prior_guidance_scale,
                    seed=call.seed + i,
                    candidates=prior_candidates,
                    captions=repeated[rows],
                )
            chunks.append(self._decode(image_emb, text[rows], call, call.seed + i, repeated[rows]))
        return self._output(np.concatenate(chunks), call)

    @torch.no_grad()
    def image_variations(
        self,
        images: Image.Image | Sequence[Image.Image],
        num_images_per_image: int = 1,
        **options: Unpack[DecodeOptions],
    ) -> ImagePipelineOutput | tuple:
        """Variations of input images: each one's CLIP image embedding decoded several times."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("no images given")
        if num_images_per_image < 1:
            raise ValueError(f"num_images_per_image must be >= 1, got {num_images_per_image}")
        call = DecodeCall.of("image_variations", options)
        bundle = self.clip_bundle()
        emb = torch.from_numpy(encode_images(bundle, [im.convert("RGB") for im in images]))
        emb = emb.repeat_interleave(num_images_per_image, dim=0)
        # no caption: a text-conditioned decoder gets the null caption
        return self._output(self._decode(emb, None, call, call.seed), call)

    @torch.no_grad()
    def interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        frames: int = 5,
        prior_num_inference_steps: int | None = None,
        prior_guidance_scale: float | None = None,
        **options: Unpack[DecodeOptions],
    ) -> ImagePipelineOutput | tuple:
        """``frames`` images from prompt A's image embedding to prompt B's (slerp of the prior's
        samples); every frame decodes from the same noise, so only the embedding changes."""
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        call = DecodeCall.of("interpolate", options, prior=prior_guidance_scale)
        bundle = self.clip_bundle()
        check_captions([prompt_a, prompt_b], bundle)
        text = torch.from_numpy(encode_texts(bundle, [prompt_a, prompt_b]))
        ends = self.prior_sampler().sample(
            text,
            steps=prior_num_inference_steps,
            guidance_scale=prior_guidance_scale,
            seed=call.seed,
            captions=[prompt_a, prompt_b],
        )
        out = []
        for t in np.linspace(0.0, 1.0, frames):
            emb = slerp(ends[0:1], ends[1:2], float(t))
            txt = slerp(text[0:1], text[1:2], float(t))
            out.append(self._decode(emb, txt, call, call.seed))
        return self._output(np.concatenate(out), call)

    @torch.no_grad()
    def decode_image_embeddings(
        self, image_embeds: np.ndarray | torch.Tensor, **options: Unpack[DecodeOptions]
    ) -> ImagePipelineOutput | tuple:
        """Images for given CLIP image embeddings [N, D] (or one [D]): decoder, then upsampler."""
        call = DecodeCall.of("decode_image_embeddings", options)
        emb = torch.as_tensor(np.asarray(image_embeds, dtype=np.float32))
        if emb.ndim == 1:
            emb = emb[None]
        return self._output(self._decode(emb, None, call, call.seed), call)

    def _decode(
        self,
        image_emb: torch.Tensor | None,
        text_emb: torch.Tensor | None,
        call: DecodeCall,
        seed: int,
        captions: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Image embeddings [N, D] (or, for a decoder of caption tokens, ``captions``) → uint8
        images, stage after stage (decoder, then the upsampler unless ``call.upsample`` is
        False), every stage's noise from ``seed``."""
        decoder = self.decoder_sampler()
        if decoder.text_tokens:
            decoder.use_clip(self.clip_bundle())
        pixels = decoder.sample(
            image_emb,
            steps=call.steps,
            guidance_scale=call.guidance,
            seed=seed,
            text_emb=text_emb,
            captions=captions,
        )
        upsampler = self.upsampler_sampler() if call.upsample else None
        if upsampler is not None:
            pixels = upsampler.sample(pixels, steps=call.upsampler_steps, seed=seed)
        return pixels

    @staticmethod
    def _output(pixels: np.ndarray, call: DecodeCall) -> Any:
        images = pixels if call.output_type == "np" else [Image.fromarray(p) for p in pixels]
        return ImagePipelineOutput(images=images) if call.return_dict else (images,)
