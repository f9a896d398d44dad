"""The compositional shapes: objects, counts and relative positions, captioned by a small grammar.

Each sample is one of four kinds, drawn with equal odds from its own RNG seeded by
``(seed, index)`` (so the loopback server renders any sample alone, byte for byte):

- single    "a red circle"                          one object anywhere, 30–60% of the side
- count     "three red squares"                     2–4 alike objects
- pair      "a red circle and a blue square"        two objects, different colours and shapes
- relation  "a red circle left of a blue square"    two such objects side by side or stacked

Several objects sit in distinct cells of a 2 × 2 grid, each 45–70% of its cell and at least a
tenth of a cell from the cell's edges, so objects never touch and the relation between two
neighbours is unambiguous (their centres differ mostly along the relation's axis). Held-out
colour–shape pairs (``CompositionalConfig``) never occur in a generated image, and held-out
shape–relation–shape triples never in a caption (a pair sample, which names no relation, may
still show the arrangement); :func:`evaluation_prompts` asks for them apart from the seen
compositions.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

from .config import RELATIONS, SyntheticConfig

KINDS = ("single", "count", "pair", "relation")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
Obj = tuple[str, str]  # (colour, shape)


def article(word: str) -> str:
    """The indefinite article the word takes ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def object_phrase(color: str, shape: str) -> str:
    """ "a red circle", "an orange square"."""
    return f"{article(color)} {color} {shape}"


def count_phrase(n: int, color: str, shape: str) -> str:
    """ "three red squares" (``n`` of 2–4)."""
    return f"{NUMBER_WORDS[n]} {color} {shape}s"


def relation_phrase(a: Obj, relation: str, b: Obj) -> str:
    """ "a red circle left of a blue square"."""
    return f"{object_phrase(*a)} {relation} {object_phrase(*b)}"


def pair_phrase(a: Obj, b: Obj) -> str:
    """ "a red circle and a blue square"."""
    return f"{object_phrase(*a)} and {object_phrase(*b)}"


@dataclass(frozen=True)
class Compositions:
    """Which colour–shape pairs and shape relations training images may show."""

    pairs: list[Obj]  # allowed in training
    heldout_pairs: list[Obj]
    heldout_relations: set[tuple[str, str, str]]  # with each one's inverse

    @classmethod
    def of(cls, cfg: SyntheticConfig) -> Compositions:
        comp = cfg.compositional
        if comp is None:
            raise ValueError("synthetic.compositional is not set")
        held = comp.pair_list()
        pairs = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in held]
        relations = set()
        for a, rel, b in comp.relation_list():
            relations |= {(a, rel, b), (b, INVERSE[rel], a)}
        return cls(pairs=pairs, heldout_pairs=held, heldout_relations=relations)

    def seen_relation(self, a: str, relation: str, b: str) -> bool:
        return (a, relation, b) not in self.heldout_relations


def _cell_object(rng: random.Random, n: int, cell: int, color: str, shape: str) -> dict[str, Any]:
    """An object inside cell ``cell`` (0 1 / 2 3) of the 2 × 2 grid of an n-pixel image."""
    side = n / 2
    size = rng.uniform(0.45, 0.7) * side
    margin = 0.1 * side
    x0, y0 = (cell % 2) * side, (cell // 2) * side
    lo, hi = margin + size / 2, side - margin - size / 2
    return {
        "color": color,
        "shape": shape,
        "cx": x0 + rng.uniform(lo, hi),
        "cy": y0 + rng.uniform(lo, hi),
        "size": size,
    }


def _two_different(rng: random.Random, pairs: list[Obj]) -> tuple[Obj, Obj]:
    """Two allowed objects with different colours and different shapes."""
    a = rng.choice(pairs)
    others = [p for p in pairs if p[0] != a[0] and p[1] != a[1]]
    if not others:
        raise ValueError(
            "synthetic.compositional: two objects of different colours and shapes need at least "
            "two colours and two shapes outside the held-out pairs"
        )
    return a, rng.choice(others)


# Cells of a side-by-side or stacked pair, first object first: "left of" puts it in cell 0 of a row.
_RELATION_CELLS = {
    "left of": [(0, 1), (2, 3)],
    "right of": [(1, 0), (3, 2)],
    "above": [(0, 2), (1, 3)],
    "below": [(2, 0), (3, 1)],
}


def compositional_spec(cfg: SyntheticConfig, index: int) -> dict[str, Any]:
    """Kind, caption, objects and background of sample ``index`` (deterministic in seed and index)."""
    comp = Compositions.of(cfg)
    rng = random.Random(f"unclip-compositional:{cfg.seed}:{index}")
    n = cfg.image_size
    kind = rng.choice(KINDS)
    relation = None
    if kind == "single":
        color, shape = rng.choice(comp.pairs)
        size = rng.uniform(0.3, 0.6) * n
        half = size / 2
        objects = [
            {
                "color": color,
                "shape": shape,
                "cx": rng.uniform(half + 1, n - half - 1),
                "cy": rng.uniform(half + 1, n - half - 1),
                "size": size,
            }
        ]
        caption = object_phrase(color, shape)
    elif kind == "count":
        color, shape = rng.choice(comp.pairs)
        count = rng.randint(2, 4)
        cells = rng.sample(range(4), count)
        objects = [_cell_object(rng, n, c, color, shape) for c in cells]
        caption = count_phrase(count, color, shape)
    elif kind == "pair":
        a, b = _two_different(rng, comp.pairs)
        cells = rng.sample(range(4), 2)
        objects = [_cell_object(rng, n, c, *o) for c, o in zip(cells, (a, b), strict=True)]
        caption = pair_phrase(a, b)
    else:
        a, b = _two_different(rng, comp.pairs)
        allowed = [r for r in RELATIONS if comp.seen_relation(a[1], r, b[1])]
        if not allowed:
            raise ValueError(
                f"synthetic.compositional.heldout_relations hold out every relation of a "
                f"{a[1]} and a {b[1]} (sample {index}): leave one relation per pair of shapes"
            )
        relation = rng.choice(allowed)
        cells = rng.choice(_RELATION_CELLS[relation])
        objects = [_cell_object(rng, n, c, *o) for c, o in zip(cells, (a, b), strict=True)]
        caption = relation_phrase(a, relation, b)
    return {
        "index": index,
        "kind": kind,
        "caption": caption,
        "color": objects[0]["color"],
        "shape": objects[0]["shape"],
        "objects": objects,
        "relation": relation,
        "background": tuple(rng.randint(232, 255) for _ in range(3)),
    }


def heldout_pair_specs(cfg: SyntheticConfig, per_pair: int) -> list[dict[str, Any]]:
    """Images no training sample shows: each held-out colour–shape pair drawn alone, ``per_pair``
    times, in the geometry and background of the first ``per_pair`` single-object samples. They
    tell what a decoder draws from a held-out pair's real image embedding."""
    comp = Compositions.of(cfg)
    singles: list[dict[str, Any]] = []
    index = 0
    while len(singles) < per_pair:
        spec = compositional_spec(cfg, index)
        if spec["kind"] == "single":
            singles.append(spec)
        index += 1
    out = []
    for color, shape in comp.heldout_pairs:
        for spec in singles:
            obj = {**spec["objects"][0], "color": color, "shape": shape}
            caption = object_phrase(color, shape)
            out.append(
                {
                    **spec,
                    "index": None,
                    "caption": caption,
                    "color": color,
                    "shape": shape,
                    "objects": [obj],
                }
            )
    return out


def heldout_relation_specs(cfg: SyntheticConfig, per_relation: int) -> list[dict[str, Any]]:
    """Pictures of the held-out relations, drawn as relation samples: ``per_relation`` for each
    triple of ``heldout_relations``, captioned alternately in its wording and its inverse's
    ("a red triangle above a blue circle", "a blue circle below a red triangle"), each object a
    colour–shape pair training images show. No training caption names these relations, though a
    pair sample may show the arrangement. With :func:`swap_places` they tell whether CLIP's text
    side points a held-out relation at its picture rather than at the inverse one."""
    comp = Compositions.of(cfg)
    n = cfg.image_size
    out = []
    for a, rel, b in cfg.compositional.relation_list() if cfg.compositional else []:
        colors_b = [c for c, s in comp.pairs if s == b]
        colors_a = [c for c, s in comp.pairs if s == a and set(colors_b) - {c}]
        if not colors_a:
            raise ValueError(
                f"synthetic.compositional: drawing the held-out relation '{a} {rel} {b}' "
                f"needs a seen {a} and a seen {b} of another colour"
            )
        for i in range(per_relation):
            rng = random.Random(f"unclip-heldout-relation:{cfg.seed}:{a}:{rel}:{b}:{i}")
            color_a = rng.choice(colors_a)
            color_b = rng.choice([c for c in colors_b if c != color_a])
            cells = rng.choice(_RELATION_CELLS[rel])
            first = _cell_object(rng, n, cells[0], color_a, a)
            second = _cell_object(rng, n, cells[1], color_b, b)
            if i % 2:  # the inverse wording of the same picture
                first, second, relation = second, first, INVERSE[rel]
            else:
                relation = rel
            pair_a = (first["color"], first["shape"])
            pair_b = (second["color"], second["shape"])
            out.append(
                {
                    "index": None,
                    "kind": "relation",
                    "caption": relation_phrase(pair_a, relation, pair_b),
                    "color": pair_a[0],
                    "shape": pair_a[1],
                    "objects": [first, second],
                    "relation": relation,
                    "background": tuple(rng.randint(232, 255) for _ in range(3)),
                }
            )
    return out


def swap_places(spec: dict[str, Any], image_size: int) -> dict[str, Any]:
    """A spec of two objects in grid cells with the cells traded: the inverse relation's picture.
    Each object keeps its size and its offset inside its cell, so it keeps its margins; the
    background stays, and so does the caption."""
    side = image_size / 2

    def corner(obj: dict[str, Any]) -> tuple[float, float]:
        return (obj["cx"] // side) * side, (obj["cy"] // side) * side

    first, second = spec["objects"]
    (ax, ay), (bx, by) = corner(first), corner(second)
    return {
        **spec,
        "objects": [
            {**first, "cx": first["cx"] - ax + bx, "cy": first["cy"] - ay + by},
            {**second, "cx": second["cx"] - bx + ax, "cy": second["cy"] - by + ay},
        ],
    }


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: its task, caption, what the image must show, and whether held out."""

    task: str
    caption: str
    objects: tuple[Obj, ...]
    heldout: bool
    count: int = 1
    relation: str | None = None


def _candidates(cfg: SyntheticConfig, task: str) -> list[Prompt]:
    """Every prompt of a task, seen and held out."""
    comp = Compositions.of(cfg)
    held = set(comp.heldout_pairs)
    pairs = [(c, s) for c in cfg.colors for s in cfg.shapes]
    two = [(a, b) for a, b in itertools.permutations(pairs, 2) if a[0] != b[0] and a[1] != b[1]]
    if task in ("single_object", "colors"):
        return [Prompt(task, object_phrase(*p), (p,), p in held) for p in pairs]
    if task == "counting":
        return [
            Prompt(task, count_phrase(k, *p), (p,), p in held, count=k)
            for p in pairs
            for k in NUMBER_WORDS
        ]
    if task in ("two_object", "color_attr"):
        return [Prompt(task, pair_phrase(a, b), (a, b), a in held or b in held) for a, b in two]
    if task == "position":
        # Held out: the shapes' relation is; seen: neither the relation nor a colour–shape pair is.
        out = []
        for (a, b), rel in itertools.product(two, RELATIONS):
            rel_held = not comp.seen_relation(a[1], rel, b[1])
            if rel_held or (a not in held and b not in held):
                out.append(Prompt(task, relation_phrase(a, rel, b), (a, b), rel_held, relation=rel))
        return out
    raise ValueError(f"unknown compositional task {task!r}; tasks: {list(TASKS)}")


def evaluation_prompts(cfg: SyntheticConfig, per_task: int, seed: int = 0) -> list[Prompt]:
    """``per_task`` seen and ``per_task`` held-out prompts of every task (fewer where fewer exist)."""
    out = []
    for task in TASKS:
        rng = random.Random(f"unclip-compositional-prompts:{seed}:{task}")
        candidates = _candidates(cfg, task)
        for heldout in (False, True):
            group = [p for p in candidates if p.heldout == heldout]
            rng.shuffle(group)
            out.extend(group[:per_task])
    return out


def sample_prompts(spec: dict[str, Any], cfg: SyntheticConfig) -> list[tuple[Prompt, bool]]:
    """Prompts a rendered sample answers, each with the truth: what it shows, and near misses.

    The near misses change one thing the oracle must see: another colour, one more or one
    fewer object, swapped colours, an absent shape, the inverse relation. They check that the
    pixel oracle says no as reliably as yes.
    """
    objs = [(o["color"], o["shape"]) for o in spec["objects"]]
    a = objs[0]
    other_color = next(c for c in cfg.colors if c != a[0])
    if spec["kind"] == "single":
        other_shape = next(s for s in cfg.shapes if s != a[1])
        return [
            (Prompt("single_object", object_phrase(*a), (a,), False), True),
            (Prompt("colors", object_phrase(*a), (a,), False), True),
            (
                Prompt("colors", object_phrase(other_color, a[1]), ((other_color, a[1]),), False),
                False,
            ),
            (
                Prompt(
                    "single_object", object_phrase(a[0], other_shape), ((a[0], other_shape),), False
                ),
                False,
            ),
        ]
    if spec["kind"] == "count":
        n = len(objs)
        wrong = n + 1 if n < 4 else n - 1
        return [
            (Prompt("counting", count_phrase(n, *a), (a,), False, count=n), True),
            (Prompt("counting", count_phrase(wrong, *a), (a,), False, count=wrong), False),
        ]
    b = objs[1]
    swapped = ((b[0], a[1]), (a[0], b[1]))
    absent = next(s for s in cfg.shapes if s not in (a[1], b[1]))
    out = [
        (Prompt("two_object", pair_phrase(a, b), (a, b), False), True),
        (Prompt("color_attr", pair_phrase(a, b), (a, b), False), True),
        (Prompt("color_attr", pair_phrase(*swapped), swapped, False), False),
        (Prompt("two_object", pair_phrase(a, (b[0], absent)), (a, (b[0], absent)), False), False),
    ]
    if spec["kind"] == "relation":
        rel = spec["relation"]
        out += [
            (Prompt("position", relation_phrase(a, rel, b), (a, b), False, relation=rel), True),
            (
                Prompt(
                    "position",
                    relation_phrase(a, INVERSE[rel], b),
                    (a, b),
                    False,
                    relation=INVERSE[rel],
                ),
                False,
            ),
        ]
    return out
