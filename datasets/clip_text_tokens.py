"""Per-token text encodings of a CLIP, for the prior's optional text tokens.

What a token encoding is: the text transformer's last hidden state after ln_final, before
pooling (Karlo, DALLE2-pytorch). diffusers' PriorTransformer projects encoder states of the
image-embedding width only, so when the text width differs (the bootstrap CLIP) each token
goes through CLIP's own frozen text_projection — the map that turns the pooled token into the
text embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .clip import ClipBundle

TOKENS_RAW = "ln_final"
TOKENS_PROJECTED = "ln_final+text_projection"


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ln_final and text_projection: the CLIP itself, or its ``.text``."""
    return model if hasattr(model, "ln_final") else getattr(model, "text", model)


def text_context_length(bundle: ClipBundle) -> int:
    """Tokens per caption of this CLIP's tokenizer (its text context length)."""
    n = getattr(bundle.tokenizer, "context_length", None) or getattr(
        bundle.model, "context_length", None
    )
    if not n:
        raise ValueError(f"CLIP {bundle.clip_id}: cannot tell its text context length")
    return int(n)


def _project(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = getattr(_text_tower(model), "text_projection", None)
    if proj is None:
        raise ValueError(
            "this CLIP has no text_projection to map its tokens to the embedding width"
        )
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _pad_id(tokenizer: Any) -> int:
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps one
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if pad is not None else 0  # SimpleTokenizer pads with 0


@torch.no_grad()
def encode_text_tokens(
    bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-token encodings float32 [N, L, D], padding mask bool [N, L] and their kind.

    L is the CLIP's text context length and D its embedding width. The mask is true for the
    caption's tokens (start and end tokens included) and false for padding. The kind is
    ``TOKENS_RAW`` when the text width is the embedding width (as for the public CLIPs Karlo
    and DALLE2-pytorch use), else ``TOKENS_PROJECTED``.
    """
    texts = list(texts)
    length, dim = text_context_length(bundle), bundle.embed_dim
    enc = np.zeros((len(texts), length, dim), np.float32)
    mask = np.zeros((len(texts), length), bool)
    kind = TOKENS_RAW
    pad = _pad_id(bundle.tokenizer)
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(texts[start : start + batch_size]).to(bundle.device)
        out = bundle.model.forward_intermediates(
            text=tokens, text_indices=1, normalize_intermediates=True, intermediates_only=True
        )
        x = out["text_intermediates"][-1]  # ln_final(last block): [B, L, text width]
        if x.shape[-1] != dim:
            x, kind = _project(bundle.model, x), TOKENS_PROJECTED
        stop = start + tokens.shape[0]
        enc[start:stop] = x.float().cpu().numpy()
        mask[start:stop] = (tokens != pad).cpu().numpy()
    return enc, mask, kind
