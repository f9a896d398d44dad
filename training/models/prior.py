"""The DALL·E 2 diffusion prior (CLIP text embedding → CLIP image embedding) on diffusers' PriorTransformer.

The transformer reads the causal sequence [text embedding, timestep, noised image embedding,
learned query] and predicts the clean image embedding x_0, trained with MSE (Ramesh et al. 2022,
sec. 2.2). With ``prior.text_tokens`` the caption's per-token encodings come first, [text tokens,
text embedding, timestep, noised image embedding, learned query], as in Karlo: the frozen CLIP
text transformer's last hidden states (after ln_final, before pooling; through CLIP's
text_projection when the text width is not the embedding width), computed on the training
workers from the captions with the CLIP the embeddings were made with, and passed to
``PriorTransformer`` as ``encoder_hidden_states`` with the padding ``attention_mask``.

The condition is one tensor per row, so conditioning dropout and classifier-free guidance treat
it whole: the text embedding alone, or with tokens ``[text embedding | token encodings | token
mask]`` (:func:`pack_condition`). A dropped row (or guidance's unconditional half) is all zeros:
a zero text embedding and no tokens at all.

Image embeddings are normalized by the data set's mean and std; the model keeps them as its
``clip_mean`` / ``clip_std`` so ``post_process_latents`` undoes the normalization for any
diffusers user of the export. ``prior.init_from`` starts a run from a diffusers-format prior
(checked against the config; its weights' hash joins the run name).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns, ShardSource

from ..config import PriorConfig
from ..diffusion import Sampler, drop_condition, noised, sample_loop
from ..engine.artifacts import is_local, local_dir
from ..engine.trainer import FitResult, fit, run_name_for
from .caption_tokens import (
    CaptionClip,
    CaptionTokens,
    pack_condition,
    token_condition,
    unpack_condition,
)
from .diffusion_task import ExportedDiffusion, ManifestDiffusionTask

if TYPE_CHECKING:
    pass

MODEL_KIND = "prior"
INFO_FILE = "unclip_prior.json"
STD_FLOOR = 1e-4  # a dimension that never varies must not divide by ~0
TOKENS_KEY = "prior.text_tokens"


def build_prior(
    cfg: PriorConfig,
    dim: int,
    image_mean: np.ndarray,
    image_std: np.ndarray,
    text_context: int = 0,
) -> PriorTransformer:
    """An untrained prior for embeddings of dimension ``dim`` with the data set's image statistics.

    With ``cfg.text_tokens``, ``text_context`` is the CLIP's text context length: that many
    token encodings (of width ``dim``) precede the 4 additional tokens.
    """
    if cfg.text_tokens and text_context < 1:
        raise ValueError(f"{TOKENS_KEY} needs the CLIP's text context length, got {text_context}")
    tokens = int(text_context) if cfg.text_tokens else 0
    model = PriorTransformer(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        num_layers=cfg.num_layers,
        embedding_dim=dim,
        num_embeddings=tokens,  # text-token encodings, before the 4 additional tokens
        additional_embeddings=4,  # text embedding, timestep, noised image embedding, query
        encoder_hid_proj_type="linear" if tokens else None,
        added_emb_type="prd",  # the learned query whose output is the prediction
        embedding_proj_norm_type="layer",  # L2-normalized CLIP vectors are small: rescale them
        norm_in_type="layer",
    )
    with torch.no_grad():
        model.clip_mean.copy_(torch.as_tensor(image_mean, dtype=torch.float32).view(1, -1))
        model.clip_std.copy_(torch.as_tensor(np.maximum(image_std, STD_FLOOR)).view(1, -1))
    # Statistics of the data, not weights: keep them out of the optimizer (and its weight decay).
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    return model


# --- fine-tuning from a diffusers-format prior -----------------------------------------------
INIT_KEY = "prior.init_from"
# Where each PriorTransformer argument comes from, to name it in a mismatch (the rest are fixed
# by build_prior: the 4 additional tokens, the layer norms, the learned query).
_ARG_SOURCE = {
    "num_layers": "prior.num_layers",
    "num_attention_heads": "prior.num_attention_heads",
    "attention_head_dim": "prior.attention_head_dim",
    "embedding_dim": "the data set's embedding_dim",
    "num_embeddings": f"{TOKENS_KEY} (the CLIP's text context length, or 0)",
    "encoder_hid_proj_type": TOKENS_KEY,
}
_CONFIG_META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def init_model_dir(folder: str) -> str:
    """The PriorTransformer folder of a local ``folder``: itself, or an unclip export's ``prior/``."""
    for candidate in (folder, os.path.join(folder, PriorTask.SUBFOLDER)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"{INIT_KEY}: {folder} holds no PriorTransformer (neither config.json nor "
        f"{PriorTask.SUBFOLDER}/config.json, as save_pretrained or an unclip export writes)"
    )


def weights_digest(model_dir: str) -> str:
    """sha256 over the names and bytes of a saved model's files: its identity, wherever it lies."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_init_prior(
    path: str, cfg: PriorConfig, dim: int, clip_id: str, text_context: int = 0
) -> tuple[PriorTransformer, str]:
    """(the prior at ``path``, its weights digest), checked against the config and the data set.

    A clear error names ``prior.init_from``, the path and each mismatched key.
    """
    fs_path = path if not is_local(path) else os.path.abspath(path.removeprefix("file://"))
    if is_local(path) and not os.path.isdir(fs_path):
        raise FileNotFoundError(f"{INIT_KEY}: no such folder: {fs_path}")
    with local_dir(path) as d:
        model_dir = init_model_dir(d)
        info_path = os.path.join(d, INFO_FILE)
        if os.path.isfile(info_path):  # an unclip export says which CLIP it was trained on
            with open(info_path) as f:
                trained_on = json.load(f).get("clip_id")
            if trained_on and trained_on != clip_id:
                raise ValueError(
                    f"{INIT_KEY}: {path} was trained on embeddings of CLIP {trained_on}, "
                    f"but this data set's are of CLIP {clip_id}"
                )
        with open(os.path.join(model_dir, "config.json")) as f:
            theirs = json.load(f)
        with torch.device("meta"):  # only its config: allocate no weights
            ours = dict(build_prior(cfg, dim, np.zeros(dim), np.ones(dim), text_context).config)
        wrong = [
            f"{k} is {theirs.get(k)!r} there, {ours[k]!r} in {_ARG_SOURCE.get(k, 'unclip prior')}"
            for k in sorted(ours)
            if k not in _CONFIG_META and theirs.get(k, ours[k]) != ours[k]
        ]
        if wrong:
            raise ValueError(
                f"{INIT_KEY}: the prior at {path} does not match this run: " + "; ".join(wrong)
            )
        model = PriorTransformer.from_pretrained(model_dir, low_cpu_mem_usage=False)
        return model, weights_digest(model_dir)


def causal_mask(batch: int, device: torch.device) -> torch.Tensor:
    """An empty text mask: with it PriorTransformer applies its causal mask (without, none)."""
    return torch.ones(batch, 0, dtype=torch.bool, device=device)


def predict_x0(
    model: PriorTransformer | Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """The prior's x_0 prediction (normalized space) for noised embeddings ``x_t``.

    ``cond`` is the text embedding [N, D], or for a prior with text tokens the
    :func:`pack_condition` rows.
    """
    # ``model`` may be the DeepSpeed engine around the prior (whose own .config is DeepSpeed's)
    text_context = int(getattr(model, "module", model).config.num_embeddings)
    if text_context == 0:
        mask = causal_mask(x_t.shape[0], x_t.device)
        out = model(x_t, t, proj_embedding=cond, attention_mask=mask)
        return out.predicted_image_embedding
    text, tokens, token_mask = unpack_condition(cond, text_context, x_t.shape[-1])
    # The padding mask also turns on the causal mask; masked tokens get -10000 as keys.
    out = model(
        x_t, t, proj_embedding=text, encoder_hidden_states=tokens, attention_mask=token_mask
    )
    return out.predicted_image_embedding


@dataclass(kw_only=True)
class PriorTask(CaptionTokens, ManifestDiffusionTask):
    """The prior as a :class:`~unclip.training.engine.trainer.TrainTask` over one dataset version."""

    MODEL_KIND: ClassVar[str] = MODEL_KIND
    SUBFOLDER: ClassVar[str] = "prior"
    INFO_FILE: ClassVar[str] = INFO_FILE
    PREDICTION: ClassVar[Literal["epsilon", "sample"]] = "sample"
    CLIP_SAMPLE: ClassVar[bool] = False
    TOKENS_KEY: ClassVar[str] = TOKENS_KEY

    cfg: PriorConfig
    image_mean: list[float]
    image_std: list[float]
    init_path: str | None = None  # cfg.init_from, absolute (workers run elsewhere)
    init_digest: str | None = None  # its weights' sha256: part of the run's identity

    @classmethod
    def from_manifest(
        cls, layout: StorageLayout, version: str, cfg: PriorConfig, holdout_fraction: float
    ) -> PriorTask:
        task = super().from_manifest(layout, version, cfg, holdout_fraction)
        if cfg.text_tokens:
            task.attach_clip_record(layout, task.clip_id)
        if cfg.init_from is not None:
            model, digest = load_init_prior(
                cfg.init_from, cfg, task.dim, task.clip_id, task.text_context
            )
            local = is_local(cfg.init_from)
            task.init_path = (
                os.path.abspath(cfg.init_from.removeprefix("file://")) if local else cfg.init_from
            )
            task.init_digest = digest
            # Keep the starting prior's normalization: its weights were trained in that space.
            task.image_mean = model.clip_mean.detach().view(-1).tolist()
            task.image_std = model.clip_std.detach().view(-1).tolist()
        return task

    @classmethod
    def train(
        cls, layout: StorageLayout, version: str, cfg: PriorConfig, holdout_fraction: float
    ) -> FitResult:
        task = cls.from_manifest(layout, version, cfg, holdout_fraction)
        return fit(task, cfg.trainer, layout, cls.MODEL_KIND, task.run_name())

    def run_name(self) -> str:
        """Hash of config, data version, seed and, when fine-tuning, the starting weights."""
        start = [{"init_weights": self.init_digest}] if self.init_digest else []
        return run_name_for(
            self.MODEL_KIND,
            self.cfg,
            self.holdout_fraction,
            *start,
            data_version=self.manifest_version,
            seed=self.cfg.trainer.seed,
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.init_digest:
            out["init_weights"] = self.init_digest
        return out

    @classmethod
    def manifest_fields(cls, layout: StorageLayout, manifest: dict[str, Any]) -> dict[str, Any]:
        if int(manifest.get("num_samples", 0)) < 1:
            raise ValueError(
                f"dataset version {manifest['version']!r} has no samples: nothing to train on"
            )
        from unclip.datasets import readers  # pyarrow: loaded only to read data

        stats = readers.load_embedding_stats(layout, manifest)
        return {
            "image_mean": stats["image_mean"].tolist(),
            "image_std": stats["image_std"].tolist(),
        }

    def build_model(self) -> PriorTransformer:
        model = build_prior(
            self.cfg,
            self.dim,
            np.array(self.image_mean),
            np.array(self.image_std),
            self.text_context,
        )
        if self.init_path is not None:
            start, digest = load_init_prior(
                self.init_path, self.cfg, self.dim, self.clip_id, self.text_context
            )
            if digest != self.init_digest:
                raise RuntimeError(
                    f"{INIT_KEY}: the weights at {self.init_path} changed after the run was named"
                )
            model.load_state_dict(start.state_dict())
        return model

    @property
    def uses_text_tokens(self) -> bool:
        return self.cfg.text_tokens

    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        from unclip.datasets.stream_sources import EmbeddingSource

        return EmbeddingSource(self.layout, manifest, "train", self.holdout_fraction)

    def batch(self, columns: Columns) -> dict[str, torch.Tensor]:
        mean = np.asarray(self.image_mean, np.float32)
        std = np.maximum(np.asarray(self.image_std, np.float32), STD_FLOOR)
        image = (np.asarray(columns["image_embedding"], np.float32) - mean) / std
        out = {
            "text": torch.from_numpy(np.ascontiguousarray(columns["text_embedding"], np.float32)),
            "image": torch.from_numpy(image.astype(np.float32)),
        }
        if self.cfg.text_tokens:
            enc, mask = self.token_encodings(list(columns["caption"]))
            out["tokens"], out["token_mask"] = torch.from_numpy(enc), torch.from_numpy(mask)
        return out

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's condition rows: the text embedding, packed with its tokens when it has them."""
        if not self.cfg.text_tokens:
            return batch["text"]
        if "tokens" not in batch:
            raise ValueError(f"{TOKENS_KEY} is on but the batch has no token encodings")
        return pack_condition(batch["text"], batch["tokens"], batch["token_mask"])

    def export_info(self) -> dict[str, Any]:
        return {"candidates": self.cfg.candidates, **self.token_export_info()}

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # L = ‖f(x_t, t, y) − x_0‖²  (Ramesh et al. 2022, eq. in sec. 2.2), y dropped for CFG.
        # With text tokens the dropped rows lose their tokens too: the null condition is null.
        x0 = batch["image"]
        x_t, _, t = noised(self.train_scheduler(), x0)
        cond = drop_condition(self.condition(batch), self.cfg.cond_drop_prob)
        pred = predict_x0(model, x_t, t, cond)
        return F.mse_loss(pred.float(), x0.float()), {}


def train_prior(
    layout: StorageLayout, manifest_version: str, cfg: PriorConfig, holdout_fraction: float
) -> FitResult:
    """Train (or resume, or skip when done) the prior on a dataset version; export to ``run_dir/export``."""
    return PriorTask.train(layout, manifest_version, cfg, holdout_fraction)


class PriorSampler(CaptionClip, ExportedDiffusion):
    """An exported prior, ready to turn text embeddings (or captions) into image embeddings."""

    TASK = PriorTask
    MODEL_CLASS = PriorTransformer

    @property
    def text_tokens(self) -> bool:
        """Whether this prior was trained with text-token encodings (``prior.text_tokens``)."""
        return bool(self.info.get("text_tokens", False))

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        candidates: int | None = None,
        sampler: Sampler = "ddim",
        *,
        captions: Sequence[str] | None = None,
        token_encodings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """L2-normalized image embeddings [N, D] for text embeddings [N, D] and/or N captions.

        With only ``captions``, their text embeddings come from the CLIP (:meth:`caption_clip`).
        A prior trained with text tokens also needs each row's token encodings: computed from
        ``captions`` with that CLIP, or given as ``token_encodings`` = (encodings [N, L, D],
        mask [N, L]); a prior without them ignores both. With ``candidates = k > 1``, k
        embeddings are drawn per text and the one with the highest dot product with the text
        embedding is kept (Ramesh et al. 2022, sec. 2.2). Steps, guidance scale and k default to
        the export's (the config's ``prior`` section).
        """
        if text_emb is None:
            if captions is None:
                raise ValueError("give text embeddings or captions")
            from unclip.datasets.clip import encode_texts

            text_emb = torch.from_numpy(encode_texts(self.caption_clip(), list(captions)))
        text = torch.as_tensor(text_emb, dtype=torch.float32)
        if text.ndim != 2 or text.shape[1] != self.dim:
            raise ValueError(f"text embeddings must be [N, {self.dim}], got {list(text.shape)}")
        if self.text_tokens and captions is None and token_encodings is None:
            raise ValueError(
                f"this prior was trained with text-token encodings ({TOKENS_KEY}) of CLIP "
                f"{self.info.get('clip_id')}: text embeddings alone are not enough; pass "
                "captions= (encoded here with that CLIP) or token_encodings="
            )
        if candidates is None:
            candidates = int(self.info.get("candidates", 1))
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        steps = int(steps if steps is not None else self.info.get("sample_steps", 50))
        scale = float(
            guidance_scale if guidance_scale is not None else self.info.get("guidance_scale", 1.0)
        )
        n = text.shape[0]
        text = text.to(self.device)
        if self.text_tokens:
            clip = self.caption_clip() if token_encodings is None else None
            cond = token_condition(
                text, int(self.model.config.num_embeddings), captions, token_encodings, clip
            )
        else:
            cond = text
        cond = cond.repeat_interleave(candidates, dim=0)
        x0 = sample_loop(
            lambda x, t, c: predict_x0(self.model, x, t, c),
            (cond.shape[0], self.dim),
            cond,
            self.scheduler_config,
            steps,
            scale,
            seed,
            sampler,
        )
        emb = F.normalize(self.model.post_process_latents(x0).float(), dim=-1)
        if candidates > 1:
            emb = emb.view(n, candidates, self.dim)
            best = (emb * text[:, None, :]).sum(-1).argmax(dim=1)
            emb = emb[torch.arange(n, device=emb.device), best]
        return emb.cpu()


def load_prior(export_dir: str, device: str = "cpu") -> PriorSampler:
    """Load an exported prior (``train_prior(...).export_dir``)."""
    return PriorSampler.load(export_dir, device)
