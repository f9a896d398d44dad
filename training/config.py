"""Typed config sections owned by ``unclip.training``; ``unclip.pipelines.config`` composes them."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from unclip.datasets.config_base import IDENTITY_UNLESS_DEFAULT, IdentitySection

from .trainer_config import TrainerConfig, setting

# The sample grid's captions on the synthetic shapes (what evaluate.captions defaults to there).
SHAPE_CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


# T, the diffusion steps of a model's training noise schedule (prior, decoder, upsampler).
DiffusionSteps = Annotated[int, Field(ge=1)]


class BootstrapClipConfig(IdentitySection):
    """Training the bootstrap CLIP (architecture in the ``clip`` section)."""

    # 2 CPU workers × 64 = 128 pairs a step: the default architecture reaches ~95% zero-shot
    # accuracy on the synthetic shapes after ~100 steps and 100% by ~200 (≈1 step/s on 2 CPUs).
    trainer: TrainerConfig = TrainerConfig(
        max_steps=200, batch_size=64, lr=1e-3, warmup_steps=20, checkpoint_every=100
    )
    negative_swaps: list[tuple[str, str]] = Field(
        default_factory=list,
        description="Word pairs whose exchange makes a caption's hard negative (NegCLIP; "
        "Yuksekgonul et al. 2023): a caption holding a word of a pair joins the batch with the "
        "words exchanged, as one more text every image must score below its own caption. "
        "[[left, right], [above, below]] teaches relations that random captions of a batch "
        "rarely contrast. Changes the run name when set.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )

    @model_validator(mode="after")
    def _each_word_swaps_once(self) -> BootstrapClipConfig:
        words = [w for pair in self.negative_swaps for w in pair]
        twice = sorted({w for w in words if words.count(w) > 1})
        if twice:
            raise ValueError(
                f"bootstrap.negative_swaps: {twice} appear more than once in "
                f"{[list(p) for p in self.negative_swaps]}; each word may swap with one other"
            )
        return self


class PriorConfig(IdentitySection):
    """The diffusion prior (diffusers PriorTransformer): CLIP text embedding → image embedding."""

    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    timesteps: DiffusionSteps = 1000
    cond_drop_prob: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Probability of dropping a row's condition (text embedding, and its token "
        "encodings with text_tokens) for classifier-free guidance.",
    )
    text_tokens: bool = Field(
        False,
        description="Also condition on the caption's per-token encodings, as Karlo: the sequence "
        "becomes [text tokens, text embedding, timestep, noised image embedding, query]. The "
        "encodings are the frozen CLIP text transformer's last hidden states (after ln_final; "
        "through its text_projection when the text width is not the embedding width), computed "
        "from the captions with the CLIP the embeddings were made with. Sampling then needs "
        "captions. Changes the run name when on.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    sample_steps: int = setting(50, ge=1, description="DDIM steps when sampling.")
    guidance_scale: float = setting(1.0, gt=0)
    candidates: int = setting(
        1,
        ge=1,
        description="Sampling: draw k image embeddings per text and keep the one with the "
        "highest dot product with the text embedding (DALL·E 2, sec. 2.2).",
    )
    init_from: str | None = setting(
        None,
        description="Fine-tune from these weights: a PriorTransformer.save_pretrained folder or "
        "an unclip prior export, with this section's architecture and the data set's embedding "
        "dimension; its clip_mean/clip_std are kept. The run name hashes its content, not its path.",
    )
    trainer: TrainerConfig = TrainerConfig()


class PixelDiffusionObjective(IdentitySection):
    """The training objective of the pixel-space stages (decoder, upsampler)."""

    prediction_type: Literal["epsilon", "sample", "v_prediction"] = Field(
        "epsilon",
        description="What the UNet predicts: the noise ε (DDPM, unCLIP's decoder), the clean image "
        "x_0 ('sample'), or v (Salimans & Ho 2022). Sampling reads it from the export.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-γ loss weighting (Hang et al. 2023; 5 in the paper): weights each "
        "timestep's loss by min(SNR, γ) in x_0 terms. None: the unweighted loss.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )


class DecoderConfig(PixelDiffusionObjective):
    """The diffusion decoder (diffusers UNet2DConditionModel): image embedding → pixels."""

    image_size: int = Field(32, ge=8)
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    attention_levels: int = Field(
        2,
        ge=0,
        description="How many of the lowest-resolution levels use attention (guided diffusion's "
        "attention_resolutions); attention at high resolution dominates the cost.",
    )
    timesteps: DiffusionSteps = 1000
    adaptive_norm: bool = Field(
        False,
        description="Condition each ResNet block by a scale and shift of its group norm "
        "(AdaGN; Dhariwal & Nichol 2021, sec. 3) rather than by adding the timestep-and-"
        "condition embedding to its activations (diffusers' resnet_time_scale_shift).",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    cond_drop_prob: float = Field(
        0.1, ge=0, le=1, description="Probability of dropping the image embedding (for guidance)."
    )
    text_conditioning: bool = Field(
        False,
        description="Also condition on the caption's CLIP text embedding (Kandinsky 2.1's "
        "text_image embeddings; cross-attention width becomes the embedding dimension).",
    )
    text_drop_prob: float = Field(
        0.5, ge=0, le=1, description="Probability of dropping the caption embedding (unCLIP: 50%)."
    )
    condition: Literal["image_embedding", "text_tokens", "caption_transformer"] = Field(
        "image_embedding",
        description="What the decoder is conditioned on: the CLIP image embedding (unCLIP, from "
        "the prior at sampling time); or the caption alone, no prior: 'text_tokens' (Imagen) "
        "reads the frozen CLIP text transformer's token sequence by cross-attention, with the "
        "pooled text embedding added to the timestep embedding; 'caption_transformer' (GLIDE) "
        "reads the states of its own text transformer (text_encoder_*), trained with the UNet on "
        "the pixel loss, the same way. Token dropout for guidance uses cond_drop_prob.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    text_encoder_width: int = Field(
        128,
        ge=8,
        description="condition 'caption_transformer': the width of its text transformer.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    text_encoder_layers: int = Field(
        2,
        ge=1,
        description="condition 'caption_transformer': its transformer layers.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    text_encoder_heads: int = Field(
        4,
        ge=1,
        description="condition 'caption_transformer': its attention heads (dividing the width).",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    text_encoder_context: int = Field(
        32,
        ge=4,
        description="condition 'caption_transformer': tokens per caption (CLIP's byte-pair "
        "encoding, start- and end-of-text included); longer captions are cut.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    learned_variance: bool = Field(
        False,
        description="Learn Σ_θ (variance_type learned_range, 6 output channels) with the hybrid "
        "loss L_simple + vlb_weight·L_vlb (Nichol & Dhariwal 2021); DDPM sampling uses it.",
    )
    vlb_weight: float = Field(0.001, ge=0, description="λ of the hybrid loss.")
    sample_steps: int = setting(50, ge=1)
    guidance_scale: float = setting(3.0, gt=0)
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _text_once(self) -> DecoderConfig:
        if self.condition != "image_embedding" and self.text_conditioning:
            raise ValueError(
                "decoder.text_conditioning adds the caption to the image embedding; with "
                f"decoder.condition {self.condition!r} the caption is the whole condition: set one"
            )
        if self.text_encoder_width % self.text_encoder_heads:
            raise ValueError(
                f"decoder.text_encoder_width {self.text_encoder_width} must divide by "
                f"text_encoder_heads {self.text_encoder_heads}"
            )
        return self

    @model_validator(mode="after")
    def _variance_needs_eps(self) -> DecoderConfig:
        if self.learned_variance and self.prediction_type != "epsilon":
            raise ValueError(
                "decoder.learned_variance trains Σ_θ with the ε-parameterised bound: it needs "
                f"prediction_type 'epsilon', got {self.prediction_type!r}"
            )
        return self


class UpsamplerConfig(PixelDiffusionObjective):
    """A super-resolution stage (diffusers UNet2DModel): low-res image → high-res image."""

    input_size: int = Field(32, ge=4, description="Resolution of the image it is conditioned on.")
    output_size: int = Field(64, ge=8, description="Resolution it produces.")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    timesteps: DiffusionSteps = 1000
    blur_sigma_min: float = Field(
        0.4,
        ge=0,
        description="Gaussian blur of the low-res conditioning in training, σ in "
        "low-res pixels drawn from [min, max] (unCLIP sec. 2.1); 0 and 0 disable it.",
    )
    blur_sigma_max: float = Field(0.6, ge=0)
    noise_aug_max: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Noise augmentation of the conditioning in training: diffusion level "
        "s ~ U[0, max·T) applied to it and given to the model (Imagen's conditioning augmentation).",
    )
    crop_size: int | None = Field(
        None, description="Train on random crops of this many high-res pixels (None: whole images)."
    )
    residual: bool = Field(
        False,
        description="Diffuse the residual x_hi − bilinear(x_lo) rather than x_hi (SRDiff, Li et al. "
        "2022); sampling adds the bilinear image back, so a short run starts from bilinear "
        "upsampling instead of from noise.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,  # runs from before the option keep their names
    )
    sample_noise_aug: float = setting(
        0.05,
        ge=0,
        lt=1,
        description="Noise augmentation level (fraction of T) of the conditioning when sampling.",
    )
    sample_steps: int = setting(50, ge=1)
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _sizes(self) -> UpsamplerConfig:
        if self.output_size <= self.input_size:
            raise ValueError(
                f"output_size {self.output_size} must be larger than input_size {self.input_size}"
            )
        if self.blur_sigma_max < self.blur_sigma_min:
            raise ValueError(
                f"blur_sigma_max {self.blur_sigma_max} < blur_sigma_min {self.blur_sigma_min}"
            )
        if self.crop_size is not None:
            scale = self.output_size // math.gcd(self.output_size, self.input_size)
            if not 0 < self.crop_size <= self.output_size or self.crop_size % scale:
                raise ValueError(
                    f"crop_size {self.crop_size} must be in (0, output_size {self.output_size}] "
                    f"and a multiple of {scale} (so a crop covers whole low-res pixels)"
                )
        return self


class EvaluateConfig(IdentitySection):
    holdout_fraction: float = Field(0.05, gt=0, lt=1, description="Pairs held out of training.")
    captions: list[str] | None = Field(
        None,
        description="Captions drawn in the sample grid; None: four shape captions ('a red "
        "circle', …) when the synthetic set is on, else the first four distinct held-out captions "
        "of the dataset version.",
    )
    samples_per_caption: int = Field(2, ge=1)
    max_pairs: int = Field(
        1000, ge=1, description="Held-out pairs the prior's cosine suite uses at most."
    )
    # The decoder / cascade evaluation (training/evaluation/cascade_eval.py). None of these change a
    # trained run: they are left out of run names.
    num_eval_samples: int = setting(
        200,
        ge=2,
        description="Images generated for FD-CLIP / CLIP score / attribute accuracy, captions "
        "cycled from the held-out split (single-object captions on the synthetic shapes).",
    )
    eval_steps: int | None = setting(
        None,
        ge=1,
        description="Decoder DDIM steps when evaluating (None: the decoder's sample_steps).",
    )
    eval_guidance: float | None = setting(
        None,
        gt=0,
        description="Decoder guidance scale when evaluating (None: the decoder's guidance_scale).",
    )
    eval_workers: int = setting(
        2,
        ge=1,
        description="Ray tasks the evaluation's generation is split over; their features are "
        "pooled before any Fréchet distance is computed.",
    )
    eval_seed: int = setting(
        0, description="Seed of evaluation sampling and of the untrained baseline decoder."
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        description="Where the evaluation's generation runs: `cuda` (one GPU per Ray task), `cpu`, "
        "or `auto` (cuda when the Ray cluster has GPUs).",
    )
    inception_checkpoint: str | None = setting(
        None,
        description="The FID Inception-v3 weights (torch-fidelity's "
        "weights-inception-2015-12-05 state dict; local path or URI, never downloaded) for "
        "FID and KID (the `eval` extra); torchvision's ImageNet Inception is refused. "
        "None: `fid` and `kid` are null.",
    )
