"""Render the config reference (docs/config.md) from the pydantic schema.

``python -m unclip.pipelines.config_doc > docs/config.md``; a test checks the file is current.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from unclip.pipelines.config import PipelineConfig


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return (
        text.replace("typing.", "")
        .replace("unclip.datasets.config.", "")
        .replace("unclip.training.config.", "")
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
    return rows


def _submodel(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
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
