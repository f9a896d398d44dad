"""The compositional shapes: determinism, the grammar, layouts, held-out compositions, prompts."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip.datasets.compositional import (
    INVERSE,
    TASKS,
    Compositions,
    evaluation_prompts,
    heldout_relation_specs,
    sample_prompts,
    swap_places,
)
from unclip.datasets.config import CompositionalConfig, SyntheticConfig
from unclip.datasets.synthetic import (
    render_image,
    render_png,
    sample_spec,
    serve_synthetic,
    write_url_list,
)

CFG = SyntheticConfig(num_pairs=400, image_size=96, seed=3, compositional=CompositionalConfig())


def specs(cfg: SyntheticConfig = CFG) -> list[dict]:
    return [sample_spec(cfg, i) for i in range(cfg.num_pairs)]


def test_same_config_same_bytes_other_seed_other_images():
    digest = hashlib.sha256(b"".join(render_png(CFG, i) for i in range(40))).hexdigest()
    again = hashlib.sha256(b"".join(render_png(CFG.model_copy(), i) for i in range(40)))
    assert again.hexdigest() == digest
    other = CFG.model_copy(update={"seed": 4})
    assert any(render_png(CFG, i) != render_png(other, i) for i in range(40))


def test_every_kind_count_and_relation_occurs_with_its_caption():
    all_specs = specs()
    assert {s["kind"] for s in all_specs} == {"single", "count", "pair", "relation"}
    counts = {len(s["objects"]) for s in all_specs if s["kind"] == "count"}
    assert counts == {2, 3, 4}
    assert {s["relation"] for s in all_specs if s["kind"] == "relation"} == set(INVERSE)
    by_caption = {s["caption"]: s for s in all_specs}
    assert any(c.startswith("three ") and c.endswith("s") for c in by_caption)
    assert any(" and a" in c for c in by_caption)
    for s in all_specs:
        if s["kind"] == "relation":
            a, b = s["objects"]
            want = f"{s['relation']} a" if b["color"][0] not in "aeiou" else f"{s['relation']} an"
            assert want in s["caption"] and s["caption"].endswith(f"{b['color']} {b['shape']}")


def test_objects_stay_apart_inside_the_image_and_relations_hold_on_their_axis():
    n = CFG.image_size
    for s in specs():
        objs = s["objects"]
        for o in objs:
            half = o["size"] / 2
            assert 0 < o["cx"] - half and o["cx"] + half < n
            assert 0 < o["cy"] - half and o["cy"] + half < n
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:  # bounding boxes never touch: a gap of a tenth of a cell
                gap = (
                    max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"]))
                    - (a["size"] + b["size"]) / 2
                )
                assert gap >= 0.1 * n / 2 - 1e-9
        if s["kind"] == "relation":
            a, b = objs
            dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
            horizontal = s["relation"] in ("left of", "right of")
            assert (abs(dx) > 1.5 * abs(dy)) if horizontal else (abs(dy) > 1.5 * abs(dx))
            sign = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}
            assert sign[s["relation"]]


def test_held_out_compositions_never_occur_in_generated_images():
    comp = Compositions.of(CFG)
    held_pairs = set(comp.heldout_pairs)
    assert held_pairs == {("green", "triangle"), ("purple", "circle")}
    assert ("circle", "below", "triangle") in comp.heldout_relations  # the inverse too
    seen_relations = set()
    for s in specs():
        assert not {(o["color"], o["shape"]) for o in s["objects"]} & held_pairs
        if s["kind"] == "relation":
            a, b = s["objects"]
            triple = (a["shape"], s["relation"], b["shape"])
            assert triple not in comp.heldout_relations
            seen_relations.add(triple)
    assert len(seen_relations) > 10  # the rest of the relations do occur


def test_prompts_split_seen_and_held_out_per_task_deterministically():
    prompts = evaluation_prompts(CFG, per_task=5)
    assert prompts == evaluation_prompts(CFG, per_task=5)
    comp = Compositions.of(CFG)
    held = set(comp.heldout_pairs)
    for task in TASKS:
        for heldout in (False, True):
            group = [p for p in prompts if p.task == task and p.heldout == heldout]
            # one held-out prompt per held-out pair is all a one-object task has
            few = heldout and task in ("single_object", "colors")
            assert len(group) == (len(held) if few else 5), (task, heldout)
            assert len(set(group)) == len(group)
    for p in prompts:
        if p.task == "position":
            triple = (p.objects[0][1], p.relation, p.objects[1][1])
            assert (triple in comp.heldout_relations) == p.heldout
            if not p.heldout:
                assert not set(p.objects) & held
        else:
            assert bool(set(p.objects) & held) == p.heldout
    assert {p.count for p in prompts if p.task == "counting"} <= {2, 3, 4}


def test_bad_held_out_compositions_are_errors_naming_the_key():
    with pytest.raises(ValueError, match="heldout_pairs.*pink circle"):
        SyntheticConfig(compositional=CompositionalConfig(heldout_pairs=["pink circle"]))
    with pytest.raises(ValueError, match=r"heldout_relations\[0\]"):
        SyntheticConfig(compositional=CompositionalConfig(heldout_relations=["circle near square"]))
    with pytest.raises(ValueError, match="two different shapes"):
        SyntheticConfig(
            compositional=CompositionalConfig(heldout_relations=["circle above circle"])
        )


def test_the_server_and_url_list_serve_the_compositional_images(tmp_path):
    cfg = CFG.model_copy(update={"num_pairs": 6})
    with serve_synthetic(cfg) as base:
        write_url_list(cfg, base, str(tmp_path / "urls.parquet"))
        import urllib.request

        body = urllib.request.urlopen(f"{base}/2.png", timeout=10).read()
    assert body == render_png(cfg, 2)
    assert Image.open(io.BytesIO(body)).size == (96, 96)
    table = pq.read_table(tmp_path / "urls.parquet").to_pydict()
    assert table["caption"] == [sample_spec(cfg, i)["caption"] for i in range(6)]


def test_heldout_pair_specs_render_each_heldout_pair_no_sample_shows():
    from unclip.datasets.compositional import heldout_pair_specs
    from unclip.datasets.synthetic import color_palette, render_spec
    from unclip.training.evaluation.image_metrics import detect_objects

    cfg = SyntheticConfig(num_pairs=200, seed=3, compositional=CompositionalConfig())
    specs = heldout_pair_specs(cfg, per_pair=3)
    held = cfg.compositional.pair_list()
    assert [(s["color"], s["shape"]) for s in specs] == [p for p in held for _ in range(3)]
    seen = {sample_spec(cfg, i)["caption"] for i in range(cfg.num_pairs)}
    assert not {s["caption"] for s in specs} & seen
    palette = color_palette(cfg)
    for spec in specs:
        objects = detect_objects(np.asarray(render_spec(cfg, spec)), palette)
        assert [(o.color, o.shape) for o in objects] == [(spec["color"], spec["shape"])]
    # a sample's own spec renders as the sample does
    assert np.array_equal(
        np.asarray(render_spec(cfg, sample_spec(cfg, 5))), np.asarray(render_image(cfg, 5))
    )


def test_heldout_relation_specs_draw_each_heldout_relation_in_both_wordings():
    from unclip.datasets.synthetic import color_palette, render_spec
    from unclip.training.evaluation.compositional_eval import judge
    from unclip.training.evaluation.image_metrics import detect_objects

    cfg = SyntheticConfig(num_pairs=400, seed=3, compositional=CompositionalConfig())
    comp = Compositions.of(cfg)
    specs = heldout_relation_specs(cfg, per_relation=4)
    listed = cfg.compositional.relation_list()
    assert len(specs) == 4 * len(listed)
    for k, (a, rel, b) in enumerate(listed):
        wordings = [
            (s["objects"][0]["shape"], s["relation"], s["objects"][1]["shape"])
            for s in specs[4 * k : 4 * k + 4]
        ]
        assert wordings == [(a, rel, b), (b, INVERSE[rel], a)] * 2
    seen_captions = {sample_spec(cfg, i)["caption"] for i in range(cfg.num_pairs)}
    palette = color_palette(cfg)
    for spec in specs:
        first, second = ((o["color"], o["shape"]) for o in spec["objects"])
        assert first in comp.pairs and second in comp.pairs and first[0] != second[0]
        assert not comp.seen_relation(first[1], spec["relation"], second[1])
        assert spec["caption"] not in seen_captions
        positions = [p for p, _ in sample_prompts(spec, cfg) if p.task == "position"]
        asked, inverse = positions  # the caption's relation, then its near miss
        drawn = detect_objects(np.asarray(render_spec(cfg, spec)), palette)
        traded = detect_objects(
            np.asarray(render_spec(cfg, swap_places(spec, cfg.image_size))), palette
        )
        assert asked.caption == spec["caption"]
        assert [judge(asked, drawn), judge(inverse, drawn)] == [True, False]
        # the places traded: the inverse relation's picture, the same two objects
        assert [judge(asked, traded), judge(inverse, traded)] == [False, True]
        assert sorted((o.color, o.shape) for o in traded) == sorted([first, second])


def test_heldout_relation_specs_name_a_relation_they_cannot_draw():
    cfg = SyntheticConfig(
        colors=["red", "blue"],
        shapes=["circle", "square", "triangle"],
        compositional=CompositionalConfig(
            heldout_pairs=["blue triangle", "blue circle"],
            heldout_relations=["triangle above circle"],
        ),
    )
    with pytest.raises(ValueError, match="'triangle above circle' needs a seen triangle"):
        heldout_relation_specs(cfg, per_relation=2)
