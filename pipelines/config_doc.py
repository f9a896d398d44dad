"""Render the config reference (docs/config.md) from the pydantic schema.

``python -m unclip.pipelines.config_doc > docs/config.md``; a test checks the file is current.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel

from unclip.pipelines.config import PipelineConfig


def _type_name(annotation: Any) -> str:
    generic = get_origin(annotation) is not None
    text = str(annotation) if generic else getattr(annotation, "__name__", None) or str(annotation)
    return (
        text.replace("typing.", "")
        .replace("unclip.datasets.config.", "")
        .replace("unclip.training.config.", "")
        .replace("unclip.pipelines.config.", "")
        .replace("NoneType", "None")
    )


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = _submodel(ann)
        if sub is not None:
            summary = ((sub.__doc__ or "").strip().splitlines() or [""])[0]
            rows.append((key, sub.__name__, "", summary))
            rows.extend(_rows(sub, key + "."))
            continue
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        rows.append((key, _type_name(ann), default, field.description or ""))
        item = _contained_model(ann)
        if item is not None:  # a dict of models (column → rule) or a list that may hold them
            rows.extend(_rows(item, _item_prefix(key, name, ann)))
    return rows


# What the keys of a dict-of-models field stand for, in the rendered key paths.
_KEY_NAMES = {"metadata": "column", "models": "model"}


def _item_prefix(key: str, name: str, ann: Any) -> str:
    """``key.<column>.`` for a dict's values, ``key[].`` for a list's items (both: a dict of lists)."""
    for a in (ann, *get_args(ann)):
        if get_origin(a) is dict:
            value = get_args(a)[-1]
            return f"{key}.<{_KEY_NAMES.get(name, 'name')}>" + (
                "[]." if get_origin(value) is list else "."
            )
    return f"{key}[]."


def _contained_model(ann: Any) -> type[BaseModel] | None:
    """The model a ``dict[str, Model]`` or ``list[... | Model]`` holds (also under Optional)."""
    for a in (ann, *get_args(ann)):
        if get_origin(a) in (dict, list):
            for arg in get_args(a)[-1:]:
                for inner in (arg, *get_args(arg)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        return inner
    return None


def _submodel(ann: Any) -> type[BaseModel] | None:
    """The section a field is (a model, or an optional one); None for containers of models."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if get_origin(ann) in (dict, list):
        return None
    for arg in getattr(ann, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the pydantic schema by `python -m unclip.pipelines.config_doc`; do not edit.",
        "Unknown keys are errors. Relative paths in the file (`storage`, `sources`, `sensor.incoming`,",
        "`prior.init_from`) resolve against the config file's folder. `UNCLIP_STORAGE` overrides",
        "`storage`; `--set key.path=value` overrides any key; a relative storage root given either",
        "way resolves against the working directory.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, typ, default, doc in _rows(PipelineConfig):
        lines.append(f"| `{key}` | {typ.replace('|', '∣')} | {default.replace('|', '∣')} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
