"""Caption token encodings, shared by every model that reads the caption's token sequence.

The encodings are the frozen CLIP text transformer's last hidden states (after ln_final, before
pooling; through CLIP's text_projection when the text width is not the embedding width),
computed on the training workers from the captions with the CLIP the embeddings were made with
(its record on the storage root), and by the samplers from captions with the export's CLIP.

A model's condition stays one tensor per row, so conditioning dropout and classifier-free
guidance treat it whole: ``[text embedding | token encodings | token mask]``
(:func:`pack_condition`). A dropped row (or guidance's unconditional half) is all zeros: a zero
text embedding and no tokens at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from unclip.datasets.clip import ClipBundle
    from unclip.datasets.storage import StorageLayout

# Token encodings a worker keeps of the captions it has seen (then the cache starts over).
TOKEN_TABLE_BYTES = 1 << 30


def pack_condition(
    text: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """One row per sample: [text embedding (D) | token encodings (L·D) | token mask (L)].

    Zeroing a row (conditioning dropout, guidance's null half) zeroes all three: no tokens.
    """
    n = text.shape[0]
    return torch.cat(
        [text, tokens.reshape(n, -1).to(text.dtype), token_mask.reshape(n, -1).to(text.dtype)],
        dim=1,
    )


def unpack_condition(
    cond: torch.Tensor, text_context: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text [N, D], tokens [N, L, D], token mask bool [N, L]) of a :func:`pack_condition` row."""
    length = text_context
    if cond.ndim != 2 or cond.shape[1] != dim + length * dim + length:
        raise ValueError(
            f"a condition with {length} text tokens of width {dim} has "
            f"{dim + length * dim + length} columns, got {list(cond.shape)}"
        )
    text = cond[:, :dim]
    tokens = cond[:, dim : dim + length * dim].reshape(-1, length, dim)
    return text, tokens, cond[:, dim + length * dim :] > 0.5


def token_condition(
    text: torch.Tensor,
    text_context: int,
    captions: Sequence[str] | None,
    token_encodings: tuple[torch.Tensor, torch.Tensor] | None,
    clip: ClipBundle | None,
) -> torch.Tensor:
    """The packed condition of ``text`` with its captions' token encodings (given or computed)."""
    n, dim = text.shape
    if token_encodings is not None:
        tokens = torch.as_tensor(token_encodings[0], dtype=torch.float32)
        mask = torch.as_tensor(token_encodings[1]).bool()
    else:
        from unclip.datasets.clip_text_tokens import encode_text_tokens

        if isinstance(captions, str) or len(captions) != n:
            raise ValueError(f"give one caption per text embedding: {n} embeddings")
        enc, m, _ = encode_text_tokens(clip, list(captions))
        tokens, mask = torch.from_numpy(enc), torch.from_numpy(m)
    if tuple(tokens.shape) != (n, text_context, dim) or tuple(mask.shape) != (n, text_context):
        raise ValueError(
            f"token encodings must be [N, {text_context}, {dim}] with a mask "
            f"[N, {text_context}] for N = {n}, got {list(tokens.shape)} and {list(mask.shape)}"
        )
    return pack_condition(text, tokens.to(text.device), mask.to(text.device))


@dataclass(kw_only=True)
class CaptionTokens:
    """Mixin of a training task that encodes its captions' tokens on the workers.

    The task sets ``TOKENS_KEY`` (the config key named in errors) and ``uses_text_tokens``;
    :meth:`attach_clip_record` (from the task's ``from_manifest``) finds the CLIP.
    """

    TOKENS_KEY: ClassVar[str]

    # The CLIP that made the embeddings (its record on the storage root, from
    # ``clip/{clip_id}/identity.json``) and its text context length.
    clip_record: dict[str, Any] | None = None
    text_context: int = 0
    # on a worker: the CLIP, and the encodings of captions seen lately
    _clip: Any = field(default=None, init=False, repr=False)
    _token_cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False
    )
    _token_kind: str | None = field(default=None, init=False, repr=False)

    @property
    def uses_text_tokens(self) -> bool:
        """Whether this task's model reads token encodings (its config says)."""
        raise NotImplementedError

    def attach_clip_record(self, layout: StorageLayout, clip_id: str) -> None:
        """Record the CLIP of ``clip_id`` (the one the embeddings were made with) and its context."""
        from unclip.datasets.clip_records import clip_record, record_context_length

        try:
            record = clip_record(layout, clip_id)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(
                f"{self.TOKENS_KEY}: the token encodings come from the CLIP the embeddings were "
                f"made with, and {e}"
            ) from e
        self.clip_record = {**record, "clip_id": clip_id}
        self.text_context = record_context_length(record)

    def token_export_info(self) -> dict[str, Any]:
        """What a sampler needs to make the same token encodings (empty without tokens)."""
        if not self.uses_text_tokens:
            return {}
        record = self.clip_record or {}
        return {
            "text_tokens": True,
            "text_context_length": self.text_context,
            "text_token_features": self._token_kind,
            "clip_source": record.get("source"),
            "clip_model_cfg": record.get("model_cfg"),
        }

    def load_clip(self) -> ClipBundle:
        """The CLIP the embeddings were made with (on this worker's GPU when it has one)."""
        from unclip.datasets.clip_records import load_clip_from_record

        if self.clip_record is None:
            raise ValueError(f"{self.TOKENS_KEY}: this task has no CLIP record (use from_manifest)")
        use_gpu = self.cfg.trainer.use_gpu and torch.cuda.is_available()
        return load_clip_from_record(self.clip_record, device="cuda" if use_gpu else "cpu")

    def use_clip(self, clip: ClipBundle) -> None:
        """Encode captions' tokens with this CLIP (it must tokenize to the recorded length)."""
        from unclip.datasets.clip_text_tokens import text_context_length

        if text_context_length(clip) != self.text_context:
            raise ValueError(
                f"{self.TOKENS_KEY}: CLIP {clip.clip_id} tokenizes to {text_context_length(clip)} "
                f"tokens, its record says {self.text_context}"
            )
        self._clip, self._token_cache = clip, {}

    def setup(self, rank: int, world: int) -> None:
        if self.uses_text_tokens and self._clip is None:
            self.use_clip(self.load_clip())

    def token_encodings(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token encodings [N, L, D] and mask [N, L] of captions; each distinct caption is
        encoded once while the cache holds it (``TOKEN_TABLE_BYTES`` at most)."""
        from unclip.datasets.clip_text_tokens import encode_text_tokens

        if self._clip is None:
            raise ValueError(f"{self.TOKENS_KEY} is on but no CLIP is loaded (setup or use_clip)")
        new = sorted({c for c in captions if c not in self._token_cache})
        if new:
            enc, mask, self._token_kind = encode_text_tokens(self._clip, new)
            row_bytes = enc[0].nbytes + mask[0].nbytes
            if (len(self._token_cache) + len(new)) * row_bytes > TOKEN_TABLE_BYTES:
                self._token_cache = {}  # bounded: start over rather than grow with the data
            self._token_cache.update({c: (enc[i], mask[i]) for i, c in enumerate(new)})
        rows = [self._token_cache[c] for c in captions]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


class CaptionClip:
    """Mixin of an exported model's sampler that encodes captions with its CLIP."""

    info: dict[str, Any]
    device: str
    clip: ClipBundle | None = None  # set by use_clip, or loaded from the export's record

    def use_clip(self, clip: ClipBundle) -> None:
        """Encode captions with this (already loaded) CLIP; it must be the export's."""
        trained_on = self.info.get("clip_id")
        if trained_on and clip.clip_id != trained_on:
            raise ValueError(
                f"the model was trained on embeddings of CLIP {trained_on}, "
                f"but the CLIP given is {clip.clip_id}"
            )
        self.clip = clip

    def caption_clip(self) -> ClipBundle:
        """The CLIP for captions: the one given to :meth:`use_clip`, else the export's record."""
        if self.clip is None:
            from unclip.datasets.clip_records import load_clip_from_record

            source = self.info.get("clip_source")
            if not source:
                raise ValueError(
                    f"the export does not say where CLIP {self.info.get('clip_id')} is: "
                    "give the CLIP (use_clip) to encode captions"
                )
            record = {
                "clip_id": self.info.get("clip_id"),
                "source": source,
                "model_cfg": self.info.get("clip_model_cfg") or {},
            }
            self.clip = load_clip_from_record(record, device=self.device)
        return self.clip
