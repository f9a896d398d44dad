"""The plain options of a pipeline call: the seed, row batches, the output type, and the
decoding options every entry point shares (:class:`DecodeOptions`, checked as :class:`DecodeCall`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from ..sampling import check_guidance

OUTPUT_TYPES = ("pil", "np")


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed every stage's noise starts from: ``seed``, else one drawn from ``generator``, else 0."""
    if seed is not None and generator is not None:
        raise ValueError("give a seed or a generator, not both")
    if generator is not None:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    return 0 if seed is None else int(seed)


def row_batches(rows: int, batch_size: int | None) -> list[slice]:
    """Slices of at most ``batch_size`` rows (one slice of all rows when None)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = rows if batch_size is None else batch_size
    return [slice(a, min(a + size, rows)) for a in range(0, rows, max(size, 1))]


def check_output_type(output_type: str) -> None:
    """Refuse an output type other than PIL images or a uint8 NumPy array."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


class DecodeOptions(TypedDict, total=False):
    """The keyword arguments every ``UnclipPipeline`` entry point takes: the decoder's and the
    upsampler's steps and the decoder's guidance scale (each None: the export's), the noise
    (``seed``, else one drawn from ``generator``, else 0), and the output (``"pil"`` images or a
    uint8 ``"np"`` array; ``return_dict`` False: a tuple). ``upsample`` False stops at the
    decoder's resolution: the images the upsampler would start from."""

    decoder_num_inference_steps: int | None
    decoder_guidance_scale: float | None
    super_res_num_inference_steps: int | None
    upsample: bool
    generator: torch.Generator | None
    seed: int | None
    output_type: str
    return_dict: bool


@dataclass(frozen=True)
class DecodeCall:
    """One call's :class:`DecodeOptions`, checked, with its seed resolved."""

    steps: int | None
    guidance: float | None
    upsampler_steps: int | None
    upsample: bool
    seed: int
    output_type: str
    return_dict: bool

    @classmethod
    def of(cls, method: str, options: Mapping[str, Any], **guidance: float | None) -> DecodeCall:
        """Check ``options`` (and the call's other guidance scales) before any model runs."""
        unknown = sorted(set(options) - set(DecodeOptions.__annotations__))
        if unknown:
            raise TypeError(f"UnclipPipeline.{method}() got unexpected keyword arguments {unknown}")
        check_guidance(decoder=options.get("decoder_guidance_scale"), **guidance)
        output_type = options.get("output_type", "pil")
        check_output_type(output_type)
        return cls(
            steps=options.get("decoder_num_inference_steps"),
            guidance=options.get("decoder_guidance_scale"),
            upsampler_steps=options.get("super_res_num_inference_steps"),
            upsample=bool(options.get("upsample", True)),
            seed=resolve_seed(options.get("seed"), options.get("generator")),
            output_type=output_type,
            return_dict=options.get("return_dict", True),
        )
