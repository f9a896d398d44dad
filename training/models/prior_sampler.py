"""An exported prior turned into image embeddings: from text embeddings, or from captions with its CLIP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from ..diffusion import Sampler, sample_loop
from .caption_tokens import CaptionClip, token_condition
from .diffusion_task import ExportedDiffusion, InfoValue
from .prior import PriorTask
from .prior_model import TOKENS_KEY, predict_x0

if TYPE_CHECKING:
    pass


class PriorSampler(CaptionClip, ExportedDiffusion):
    """An exported prior, ready to turn text embeddings (or captions) into image embeddings."""

    TASK = PriorTask
    MODEL_CLASS = PriorTransformer
    # whether this prior was trained with text-token encodings (``prior.text_tokens``)
    text_tokens = InfoValue(bool, False)

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
        steps = self.sample_steps(steps)
        scale = self.guidance_scale(guidance_scale)
        n = text.shape[0]
        text = text.to(self.device)
        if self.text_tokens:
            clip = self.caption_clip() if token_encodings is None else None
            cond = token_condition(
                text, int(self.model.config.num_embeddings), captions, token_encodings, clip
            )
        else:
            cond = text
        cond = cond.repeat_interleave(candidates, dim=0).to(self.dtype)
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
