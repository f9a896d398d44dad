"""The one pipeline config: composed of each package's sections, loaded from YAML.

Unknown keys and wrong types fail before any work, with the key path and the file named.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unclip.datasets.config import (
    ClipConfig,
    EmbedConfig,
    IngestConfig,
    ManifestConfig,
    SemanticDedupConfig,
    SourceConfig,
    SyntheticConfig,
)
from unclip.training.config import (
    SHAPE_CAPTIONS,
    BootstrapClipConfig,
    DecoderConfig,
    EvaluateConfig,
    PriorConfig,
    UpsamplerConfig,
)
from unclip.training.evaluation.metric_names import CASCADE_METRIC_NAMES, PRIOR_METRIC_NAMES


class RayConfig(BaseModel):
    """Where Ray runs: ``RAY_ADDRESS`` (a cluster) wins; otherwise an embedded local Ray."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (None: all).")


class SensorConfig(BaseModel):
    """The sensor that turns new URL lists dropped into an inbox into source partitions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    incoming: str | None = Field(
        None, description="Inbox URI watched for new URL lists (None: <storage>/incoming)."
    )
    interval_seconds: int = Field(60, ge=1, description="Seconds between two looks at the inbox.")
    min_age_seconds: float = Field(
        10.0,
        ge=0,
        description="Ignore files modified less than this long ago (still being uploaded).",
    )
    running: bool = Field(
        True, description="Start the sensor as soon as the Dagster daemon runs (else off)."
    )


class ScheduleConfig(BaseModel):
    """The retraining schedule: manifest, prior and decoder, evaluation, promotion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str = Field("0 3 * * 0", description="Cron expression of the retraining runs.")
    timezone: str = Field("UTC", description="Time zone the cron expression is read in.")
    running: bool = Field(
        False, description="Start the schedule as soon as the Dagster daemon runs (else off)."
    )


class PromotionMetric(BaseModel):
    """One metric a candidate must not lose on (beyond its tolerance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(..., description="Key in the model's eval metrics JSON.")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower.")
    tolerance: float = Field(
        0.0, ge=0, description="How much worse than the promoted value still counts as a tie."
    )


def _default_gates(synthetic: bool = True) -> dict[str, list[PromotionMetric]]:
    """The gates when the config sets none: without the synthetic shapes, no shape metric."""
    decoder = [
        PromotionMetric(metric="fd_clip", mode="min", tolerance=0.0),
        PromotionMetric(metric="clip_score", mode="max", tolerance=0.005),
    ]
    if synthetic:
        decoder.append(PromotionMetric(metric="attribute_accuracy", mode="max", tolerance=0.02))
    return {
        "prior": [PromotionMetric(metric="cos_pred_true", mode="max", tolerance=0.005)],
        "decoder": decoder,
        # judged by the same cascade metrics (skipped when the config has no upsampler)
        "upsampler": list(decoder),
    }


# Metrics only the synthetic shapes give (their captions name colours and shapes to check).
SYNTHETIC_ONLY_METRICS = ("attribute_accuracy", "attribute_accuracy_untrained")


# The numeric metrics each model's evaluation writes: the only keys a gate can read.
PRIOR_GATE_METRICS = PRIOR_METRIC_NAMES
CASCADE_GATE_METRICS = CASCADE_METRIC_NAMES
GATE_METRICS = {
    "prior": PRIOR_GATE_METRICS,
    "decoder": CASCADE_GATE_METRICS,
    "upsampler": CASCADE_GATE_METRICS,
}


class PromotionConfig(BaseModel):
    """Which metrics gate promotion into ``registry/{model}.json``, per model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[Literal["prior", "decoder", "upsampler"], list[PromotionMetric]] = Field(
        default_factory=_default_gates,
        description="Per model, the metrics a candidate must beat the promoted checkpoint on.",
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> PromotionConfig:
        # A misspelt metric would be missing from every evaluation and reject every candidate.
        for model, gates in self.models.items():
            for i, g in enumerate(gates):
                if g.metric not in GATE_METRICS[model]:
                    raise ValueError(
                        f"promotion.models.{model}[{i}].metric: {g.metric!r} is not a metric "
                        f"the {model} evaluation writes; one of {', '.join(GATE_METRICS[model])}"
                    )
        return self


class PostgresConfig(BaseModel):
    """A Postgres database for the Dagster instance (runs, events, schedules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hostname: str = Field(..., description="Database host.")
    port: int = Field(5432, description="Database port.")
    db_name: str = Field("dagster", description="Database name.")
    username: str = Field("dagster", description="Database user.")
    password_env: str = Field(
        "DAGSTER_PG_PASSWORD", description="Environment variable holding the password."
    )


class InstanceConfig(BaseModel):
    """The Dagster instance behind `unclip run` and `unclip ui`: SQLite, or Postgres."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: str | None = Field(
        None, description="DAGSTER_HOME (None: $DAGSTER_HOME, else <storage>/dagster)."
    )
    postgres: PostgresConfig | None = Field(
        None, description="Keep runs and events in Postgres (needs dagster-postgres)."
    )


class PipelineConfig(BaseModel):
    """A whole unclip run: where artifacts live, what data, and how each stage runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("unclip", description="A label for this pipeline in logs and the UI.")
    storage: str = Field(..., description="Storage root: a local folder or an fsspec URI.")
    sources: list[str | SourceConfig] = Field(
        default_factory=list,
        description="URL lists (parquet/csv/tsv/jsonl, local paths or URIs; a glob is one source "
        "per matched file): a path, or an object {path, format, url_col, caption_col, metadata} "
        "with this list's own columns, format and metadata filters.",
    )
    synthetic: SyntheticConfig | None = Field(
        None, description="Generate and serve the captioned-shapes demo set as an extra source."
    )
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    clip: ClipConfig = ClipConfig()
    bootstrap: BootstrapClipConfig = BootstrapClipConfig()
    embed: EmbedConfig = EmbedConfig()
    semantic_dedup: SemanticDedupConfig = SemanticDedupConfig()
    manifest: ManifestConfig = ManifestConfig()
    prior: PriorConfig = PriorConfig()
    decoder: DecoderConfig = DecoderConfig()
    upsampler: UpsamplerConfig | None = Field(
        None,
        description="A super-resolution stage after the decoder (its input_size must be the "
        "decoder's image_size); None: no upsampler.",
    )
    evaluate: EvaluateConfig = EvaluateConfig()
    promotion: PromotionConfig = PromotionConfig()
    sensor: SensorConfig = SensorConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    instance: InstanceConfig = InstanceConfig()

    @model_validator(mode="before")
    @classmethod
    def _real_data_gates(cls, raw: Any) -> Any:
        # Gates left to their default fit the data: no shape metric without the synthetic set.
        if isinstance(raw, dict) and raw.get("synthetic") is None:
            promotion = raw.get("promotion")
            if promotion is None or (isinstance(promotion, dict) and "models" not in promotion):
                models = _default_gates(synthetic=False)
                raw = {**raw, "promotion": {**(promotion or {}), "models": models}}
        return raw

    @model_validator(mode="after")
    def _fits_the_data(self) -> PipelineConfig:
        if self.synthetic is None:
            for model, gates in self.promotion.models.items():
                for i, g in enumerate(gates):
                    if g.metric in SYNTHETIC_ONLY_METRICS:
                        raise ValueError(
                            f"promotion.models.{model}[{i}].metric: {g.metric!r} exists only on "
                            "the synthetic shapes, and this config has no `synthetic` section: "
                            "every candidate would be rejected; gate on fd_clip / clip_score"
                        )
            if self.evaluate.captions == SHAPE_CAPTIONS:
                raise ValueError(
                    "evaluate.captions: these are the synthetic shapes' captions, and this config "
                    "has no `synthetic` section; leave the key out (held-out captions of the data "
                    "are drawn) or write captions of your data"
                )
        clip_size = clip_input_size(self.clip)
        if clip_size is not None and self.ingest.image_size < clip_size:
            warnings.warn(
                f"ingest.image_size {self.ingest.image_size} is below the CLIP's input size "
                f"{clip_size} ({self.clip.model_name or 'bootstrap'}): every image is upscaled "
                "before it is embedded; set ingest.image_size to at least that",
                UserWarning,
                stacklevel=2,
            )
        return self

    @model_validator(mode="after")
    def _cascade_fits(self) -> PipelineConfig:
        if self.upsampler is not None and self.upsampler.input_size != self.decoder.image_size:
            raise ValueError(
                f"upsampler.input_size {self.upsampler.input_size} must equal "
                f"decoder.image_size {self.decoder.image_size} (the upsampler enlarges the "
                "decoder's images)"
            )
        return self

    @property
    def uses_bootstrap_clip(self) -> bool:
        return self.clip.model_name is None


def clip_input_size(clip: ClipConfig) -> int | None:
    """The image side the CLIP embeds at: the bootstrap's ``clip.image_size``, a named open_clip
    model's from its shipped config (read as JSON, nothing imported or downloaded); None when
    unknown (a local or hub checkpoint)."""
    if clip.model_name is None:
        return clip.image_size
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{clip.model_name}.json"
    if not path.is_file():
        return None
    size = json.loads(path.read_text()).get("vision_cfg", {}).get("image_size")
    return max(size) if isinstance(size, list) else size


def storage_from_env() -> str | None:
    """``UNCLIP_STORAGE`` when set (a relative path is taken from where the command runs)."""
    root = os.environ.get("UNCLIP_STORAGE")
    if not root:
        return None
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad key."""


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config; relative paths in it are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = deep_merge(raw, overrides or {})
    raw = _resolve_relative_paths(raw, path.parent)
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (misspelled?)")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def resolve(p: Any) -> Any:
        if isinstance(p, str) and "://" not in p and not Path(p).expanduser().is_absolute():
            return str((base / p).resolve())
        return p

    out = dict(raw)
    if "storage" in out:
        out["storage"] = resolve(out["storage"])
    if isinstance(out.get("sources"), list):
        out["sources"] = [
            {**s, "path": resolve(s["path"])} if isinstance(s, dict) and "path" in s else resolve(s)
            for s in out["sources"]
        ]
    sensor = out.get("sensor")
    if isinstance(sensor, dict) and sensor.get("incoming"):
        out["sensor"] = {**sensor, "incoming": resolve(sensor["incoming"])}
    prior = out.get("prior")
    if isinstance(prior, dict) and prior.get("init_from"):
        out["prior"] = {**prior, "init_from": resolve(prior["init_from"])}
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) → nested dict, for ``--set`` on the command line."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. prior.trainer.max_steps=100")
    key, value = item.split("=", 1)
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = yaml.safe_load(value)
    return node
