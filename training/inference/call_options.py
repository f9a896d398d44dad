"""The plain options of a pipeline call: the seed, row batches and the output type."""

from __future__ import annotations

import torch

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
