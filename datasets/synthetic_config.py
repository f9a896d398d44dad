"""Config sections of the synthetic shapes the demo serves: one shape per image, or the
compositional set (counts, pairs, relative positions, held-out compositions)."""

from __future__ import annotations

from pydantic import Field, model_validator

from .config_base import ConfigSection

RELATIONS = ("left of", "right of", "above", "below")


class CompositionalConfig(ConfigSection):
    """The compositional variant of the shapes: one to four objects, counts, relative positions.

    Held-out colour–shape pairs never occur in the generated (training) images, and held-out
    relations never in their captions (a pair sample, captioned without a relation, may still
    show the arrangement); the compositional evaluation prompts for them apart from the seen ones.
    """

    heldout_pairs: list[str] = Field(
        default_factory=lambda: ["green triangle", "purple circle"],
        description='Colour–shape pairs no image shows ("green triangle").',
    )
    heldout_relations: list[str] = Field(
        default_factory=lambda: ["triangle above circle", "square left of triangle"],
        description='Shape–relation–shape triples no caption names ("triangle above circle"; '
        'its inverse, "circle below triangle", is the same picture and is held out too; pair '
        "samples, captioned without a relation, may show the arrangement). Relations: left of, "
        "right of, above, below.",
    )

    def pair_list(self) -> list[tuple[str, str]]:
        """The held-out pairs as (colour, shape)."""
        out = []
        for i, text in enumerate(self.heldout_pairs):
            words = text.split()
            if len(words) != 2:
                raise ValueError(
                    f"synthetic.compositional.heldout_pairs[{i}] {text!r}: write 'colour shape'"
                )
            out.append((words[0], words[1]))
        return out

    def relation_list(self) -> list[tuple[str, str, str]]:
        """The held-out relations as (shape, relation, shape)."""
        out = []
        for i, text in enumerate(self.heldout_relations):
            rel = next((r for r in RELATIONS if f" {r} " in f" {text} "), None)
            parts = text.split(f" {rel} ") if rel else []
            if len(parts) != 2 or not all(parts) or " " in "".join(parts):
                raise ValueError(
                    f"synthetic.compositional.heldout_relations[{i}] {text!r}: write "
                    f"'shape relation shape' with a relation of {list(RELATIONS)}"
                )
            out.append((parts[0], rel, parts[1]))
        return out


class SyntheticConfig(ConfigSection):
    """The captioned-shapes demo data set, generated deterministically and served on loopback."""

    num_pairs: int = Field(2000, ge=1, description="Number of (image URL, caption) pairs.")
    image_size: int = Field(
        96, ge=16, description="Side of the generated images, before ingest resizes them."
    )
    seed: int = Field(
        0, description="Seed: the same seed gives byte-identical images and captions."
    )
    colors: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"],
        description="Colour names used in images and captions.",
    )
    shapes: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        description="Shapes drawn: circle, square, triangle.",
    )
    compositional: CompositionalConfig | None = Field(
        None,
        description="Draw the compositional set instead of one shape per image: one or two "
        "kinds of object, counts 1–4, relative positions, held-out compositions.",
    )

    @model_validator(mode="after")
    def _heldout_names_exist(self) -> SyntheticConfig:
        if self.compositional is None:
            return self
        for color, shape in self.compositional.pair_list():
            if color not in self.colors or shape not in self.shapes:
                raise ValueError(
                    f"synthetic.compositional.heldout_pairs: {color} {shape} is not a pair of "
                    f"synthetic.colors {self.colors} and synthetic.shapes {self.shapes}"
                )
        for a, rel, b in self.compositional.relation_list():
            if a not in self.shapes or b not in self.shapes or a == b:
                raise ValueError(
                    f"synthetic.compositional.heldout_relations: {a} {rel} {b} needs two "
                    f"different shapes of synthetic.shapes {self.shapes}"
                )
        return self
