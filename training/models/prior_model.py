"""The prior network: diffusers' PriorTransformer built for a data set, and how it reads its condition.

The transformer reads the causal sequence [text embedding, timestep, noised image embedding,
learned query] and predicts the clean image embedding x_0 (Ramesh et al. 2022, sec. 2.2). With
``prior.text_tokens`` the caption's per-token encodings come first, [text tokens, text
embedding, timestep, noised image embedding, learned query], as in Karlo, passed to
``PriorTransformer`` as ``encoder_hidden_states`` with the padding ``attention_mask``.

The condition is one tensor per row, so conditioning dropout and classifier-free guidance treat
it whole: the text embedding alone, or with tokens ``[text embedding | token encodings | token
mask]`` (:func:`.caption_tokens.pack_condition`). A dropped row (or guidance's unconditional half) is all zeros:
a zero text embedding and no tokens at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import PriorTransformer

from ..config import PriorConfig
from ..engine.fit_result import export_info_file
from .caption_tokens import unpack_condition

if TYPE_CHECKING:
    pass

MODEL_KIND = "prior"
SUBFOLDER = "prior"  # the PriorTransformer's folder in an export
INFO_FILE = export_info_file(MODEL_KIND)
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


def causal_mask(batch: int, device: torch.device) -> torch.Tensor:
    """An empty text mask: with it PriorTransformer applies its causal mask (without, none)."""
    return torch.ones(batch, 0, dtype=torch.bool, device=device)


def predict_x0(
    model: PriorTransformer | Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """The prior's x_0 prediction (normalized space) for noised embeddings ``x_t``.

    ``cond`` is the text embedding [N, D], or for a prior with text tokens the
    :func:`.caption_tokens.pack_condition` rows.
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
