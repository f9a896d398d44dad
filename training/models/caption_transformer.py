"""A text transformer trained with the decoder on the pixel loss (GLIDE, Nichol et al. 2022, sec. 2.3).

The Imagen-style decoder (``decoder.condition: text_tokens``) reads the frozen CLIP text
transformer's token states; this one learns its own. Captions are tokenized by CLIP's byte-pair
encoding (open_clip's ``SimpleTokenizer``, shipped with open_clip: no download), embedded with
learned token and position embeddings, and read by a small bidirectional transformer. Its token
states go to the UNet's cross-attention and their mean over the caption to the timestep
embedding, as the frozen tokens and pooled embedding do; both are trained by the decoder's
diffusion loss alone.

Two choices differ from GLIDE's (which pools the last token and is far larger), both because a
first version that made them as GLIDE does drew shapes and counts but not colours (held-out
colours 0.000 after 4,000 steps): its residual stream was dominated by the layers' outputs
(norm ~80) over embeddings of norm ~0.5, so the colour word's slot barely differed between
"red" and "blue", and the end-of-text state not at all. Here the embeddings start at unit scale
per channel (PyTorch's default), so the residual stream carries each word, and the pooled state
is the mean of the caption's slots, so every word reaches the timestep embedding.

The condition a model function receives is one integer tensor per row, ``[token ids | mask]``
(:func:`pack_caption_ids`), so conditioning dropout and guidance's null half (zeros) give a row
with no tokens: the encoder returns zero states for it, as the frozen-token path does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CLIP_BPE_VOCAB = 49408  # open_clip's SimpleTokenizer, start- and end-of-text included


@functools.cache
def _tokenizer(context_length: int):  # noqa: ANN202 - open_clip's type
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def caption_ids(captions: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, L] (long) and mask [N, L] (bool: start-of-text … end-of-text) of captions.

    A caption longer than the context is cut and still ends with end-of-text.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    tok = _tokenizer(context_length)
    ids = tok(list(captions), context_length=context_length)
    eot = (ids == tok.eot_token_id).int().argmax(dim=1)
    mask = torch.arange(context_length)[None, :] <= eot[:, None]
    return ids.long(), mask


def pack_caption_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One integer row per caption: [token ids (L) | mask (L)]; zeroing a row drops it."""
    return torch.cat([ids.long(), mask.long()], dim=1)


def unpack_caption_ids(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L] long, mask [N, L] bool) of a :func:`pack_caption_ids` row."""
    if cond.ndim != 2 or cond.shape[1] % 2 or cond.is_floating_point():
        raise ValueError(
            f"a caption-id condition is an integer [N, 2L] tensor, got {cond.dtype} "
            f"{list(cond.shape)}"
        )
    length = cond.shape[1] // 2
    return cond[:, :length], cond[:, length:] > 0


class CaptionTransformer(ModelMixin, ConfigMixin):
    """Token ids → (token states [N, L, W], their mean over the caption [N, W]); a row with no
    tokens (dropped for guidance) → zeros."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = CLIP_BPE_VOCAB,
        context_length: int = 32,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(
                f"the caption transformer's width {width} must divide by {heads} heads"
            )
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = ids.shape[1]
        if length != self.config.context_length or mask.shape != ids.shape:
            raise ValueError(
                f"caption ids must be [N, {self.config.context_length}] with a mask of the same "
                f"shape, got {list(ids.shape)} and {list(mask.shape)}"
            )
        present = mask.any(dim=1)
        # a row with no tokens attends to its first slot (an all-masked softmax is NaN), then is
        # zeroed
        attend = mask.clone()
        attend[:, 0] |= ~present
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x, src_key_padding_mask=~attend)
        x = self.ln_final(x) * present[:, None, None].to(x.dtype)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
        return x, torch.einsum("nl,nlw->nw", weights, x)


class CaptionConditionedUNet(nn.Module):
    """The decoder's UNet with its caption transformer: one module to train, shard and average."""

    def __init__(self, unet: nn.Module, text_encoder: CaptionTransformer) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        states, pooled = self.text_encoder(ids, mask)
        out = self.unet(
            x_t,
            t,
            encoder_hidden_states=states.to(x_t.dtype),
            class_labels=pooled.to(x_t.dtype),
            encoder_attention_mask=mask,
        )
        return out.sample
