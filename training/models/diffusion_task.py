"""What the prior and the decoder share: a diffusion model trained on one dataset version.

:class:`ManifestDiffusionTask` owns the manifest look-up, the task identity, the training
scheduler, the diffusers export and the run name; :class:`ExportedDiffusion` loads an export
back. A model supplies its class attributes, its data and its loss — nothing is copied.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from diffusers import DDPMScheduler

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import ShardSource

from ..config import IdentitySection
from ..diffusion import Prediction, train_scheduler
from ..engine.artifacts import local_dir
from ..engine.fit_result import FitResult, export_info_file
from ..engine.trainer import TrainTask, fit
from .run_names import manifest_run_name


@dataclass(kw_only=True)
class ManifestDiffusionTask(TrainTask):
    """A diffusion model over one dataset version; subclasses set the class attributes."""

    MODEL_KIND: ClassVar[str]  # runs/{MODEL_KIND}/…
    SUBFOLDER: ClassVar[str]  # the model's folder inside the export (diffusers layout)
    PREDICTION: ClassVar[Prediction]  # unless the config section sets prediction_type
    CLIP_SAMPLE: ClassVar[bool]

    layout: StorageLayout
    manifest_version: str
    cfg: Any  # the model's config section (with .trainer, .timesteps, .sample_steps, …)
    holdout_fraction: float
    dim: int
    clip_id: str
    _sched: DDPMScheduler | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_manifest(
        cls, layout: StorageLayout, version: str, cfg: IdentitySection, holdout_fraction: float
    ) -> ManifestDiffusionTask:
        from unclip.datasets import readers  # pyarrow: loaded only to read data

        manifest = readers.load_manifest(layout, version)
        return cls.of_embeddings(
            layout,
            version,
            cfg,
            holdout_fraction,
            manifest,
            **cls.manifest_fields(layout, manifest),
        )

    @classmethod
    def of_embeddings(
        cls,
        layout: StorageLayout,
        version: str,
        cfg: IdentitySection,
        holdout_fraction: float,
        embeddings: dict[str, Any],
        **fields: Any,
    ) -> ManifestDiffusionTask:
        """A task for embeddings of ``embeddings["embedding_dim"]`` made by CLIP ``["clip_id"]``.

        ``embeddings`` is a manifest or an export's info record: both name the two.
        """
        return cls(
            layout=layout,
            manifest_version=version,
            cfg=cfg,
            holdout_fraction=holdout_fraction,
            dim=int(embeddings["embedding_dim"]),
            clip_id=str(embeddings["clip_id"]),
            **fields,
        )

    @classmethod
    def manifest_fields(cls, layout: StorageLayout, manifest: dict[str, Any]) -> dict[str, Any]:
        """Extra constructor fields a model reads from the manifest (none by default)."""
        return {}

    @classmethod
    def train(
        cls, layout: StorageLayout, version: str, cfg: IdentitySection, holdout_fraction: float
    ) -> FitResult:
        """Train (or resume, or skip when done) on a dataset version; export to ``run_dir/export``."""
        task = cls.from_manifest(layout, version, cfg, holdout_fraction)
        name = manifest_run_name(cls.MODEL_KIND, cfg, holdout_fraction, version)
        return fit(task, cfg.trainer, layout, cls.MODEL_KIND, name)

    def data(self) -> ShardSource:
        """The training split of the dataset version, as the model's stream source."""
        from unclip.datasets import readers  # pyarrow: loaded only to read data

        manifest = readers.load_manifest(self.layout, self.manifest_version)
        return self.stream_source(manifest)

    @abstractmethod
    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        """The source the model streams from (embeddings, or images joined with them)."""

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.MODEL_KIND,
            self.MODEL_KIND: {k: v for k, v in self.cfg.identity().items() if k != "trainer"},
            "data_version": self.manifest_version,
            "holdout_fraction": self.holdout_fraction,
        }

    @property
    def prediction(self) -> Prediction:
        """What the model outputs: the section's ``prediction_type``, else the model's fixed one."""
        return getattr(self.cfg, "prediction_type", self.PREDICTION)

    def scheduler(self) -> DDPMScheduler:
        return train_scheduler(self.cfg.timesteps, self.prediction, clip_sample=self.CLIP_SAMPLE)

    def train_scheduler(self) -> DDPMScheduler:
        """The training scheduler, built once per worker."""
        if self._sched is None:
            self._sched = self.scheduler()
        return self._sched

    def export_info(self) -> dict[str, Any]:
        """Model-specific entries of the export's json (beyond the shared ones)."""
        return {}

    def save_model(self, model: torch.nn.Module, directory: str) -> None:
        """Write the trained model into the export folder (diffusers layout)."""
        model.save_pretrained(os.path.join(directory, self.SUBFOLDER))

    def export(self, model: torch.nn.Module, directory: str) -> None:
        self.save_model(model, directory)
        self.scheduler().save_pretrained(os.path.join(directory, "scheduler"))
        info = {
            "embedding_dim": self.dim,
            "clip_id": self.clip_id,
            "data_version": self.manifest_version,
            "prediction_type": self.prediction,
            "sample_steps": self.cfg.sample_steps,
            # a stage never trained with dropped conditions (an upsampler) has no guidance
            "guidance_scale": getattr(self.cfg, "guidance_scale", 1.0),
            **self.export_info(),
        }
        with open(os.path.join(directory, export_info_file(self.MODEL_KIND)), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)


@dataclass(kw_only=True)
class PixelDiffusionTask(ManifestDiffusionTask):
    """A pixel-space stage (decoder, upsampler): a diffusers UNet saved as ``unet/``, samples
    clipped to [-1, 1], ε-prediction unless the section's ``prediction_type`` says otherwise."""

    SUBFOLDER: ClassVar[str] = "unet"
    PREDICTION: ClassVar[Literal["epsilon"]] = "epsilon"  # the default of cfg.prediction_type
    CLIP_SAMPLE: ClassVar[bool] = True


T = TypeVar("T")
_REQUIRED = object()


class InfoValue(Generic[T]):
    """A sampler attribute read from the export's info json under the attribute's own name:
    ``kind(info[name])``, or ``kind(default)`` where the export has no such entry."""

    def __init__(self, kind: Callable[[Any], T], default: Any = _REQUIRED) -> None:
        self.kind, self.default = kind, default

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, obj: ExportedDiffusion | None, owner: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        if self.default is _REQUIRED:
            return self.kind(obj.info[self.key])
        return self.kind(obj.info.get(self.key, self.default))


class ExportedDiffusion:
    """An exported model with its sampling scheduler config and info, ready to sample."""

    TASK: ClassVar[type[ManifestDiffusionTask]]
    MODEL_CLASS: ClassVar[Any]  # the diffusers model class

    def __init__(
        self, model: Any, scheduler_config: dict[str, Any], info: dict[str, Any], device: str
    ) -> None:
        self.model = model.to(device).eval()
        self.scheduler_config = dict(scheduler_config)
        self.info = info
        self.device = device
        self.dtype = next(self.model.parameters()).dtype  # inputs are cast to it
        self.dim = int(info["embedding_dim"])

    @classmethod
    def load(cls, export_dir: str, device: str = "cpu") -> ExportedDiffusion:
        """Load an export written by the task's ``train(...)``."""
        task = cls.TASK
        with local_dir(export_dir) as d:
            info_file = export_info_file(task.MODEL_KIND)
            info_path = os.path.join(d, info_file)
            if not os.path.isfile(info_path):
                raise FileNotFoundError(
                    f"{export_dir} is not a {task.MODEL_KIND} export (no {info_file})"
                )
            with open(info_path) as f:
                info = json.load(f)
            model = cls.MODEL_CLASS.from_pretrained(
                os.path.join(d, task.SUBFOLDER), low_cpu_mem_usage=False
            )
            scheduler_config = dict(DDPMScheduler.load_config(os.path.join(d, "scheduler")))
            parts = cls.load_parts(d, info)
        return cls(model, scheduler_config, info, device, **parts)

    @classmethod
    def load_parts(cls, export_dir: str, info: dict[str, Any]) -> dict[str, Any]:
        """Further trained parts of an export beside its model (none by default)."""
        return {}

    def sample_steps(self, steps: int | None) -> int:
        """The sampling steps of a call: ``steps``, else the export's ``sample_steps``."""
        return int(steps if steps is not None else self.info.get("sample_steps", 50))

    def guidance_scale(self, scale: float | None) -> float:
        """The guidance scale of a call: ``scale``, else the export's ``guidance_scale``."""
        return float(scale if scale is not None else self.info.get("guidance_scale", 1.0))
