"""Experiment trackers a run reports to (``trainer.report_to``), as diffusers' training scripts do.

Rank 0 hands each row of ``metrics.jsonl`` to every tracker named in the config: TensorBoard
event files under the run folder, an MLflow run, a Weights & Biases run. Each package is an
optional extra; a run that names a missing one stops before training (:func:`check_trackers`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Any, Protocol

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

TRACKERS = ("tensorboard", "mlflow", "wandb")
# the module each tracker imports, and the extra that installs it
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TENSORBOARD_DIRNAME = "tensorboard"


class Tracker(Protocol):
    """Where rank 0 sends the scalars of each logged step."""

    def log(self, step: int, row: dict[str, Any]) -> None:
        """Record the numeric entries of ``row`` at ``step``."""

    def log_images(self, step: int, images: dict[str, str]) -> None:
        """Record PNG files (tag → local path) at ``step``: sample grids of an evaluation."""

    def flush(self) -> None:
        """Make what was logged durable (called at each checkpoint)."""

    def close(self) -> None:
        """Flush and release the tracker (end of the run)."""


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, naming the extra that installs it."""
    for name in names:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ValueError(
                f"trainer.report_to: {name!r} needs the {TRACKER_MODULES[name]} package: "
                f"pip install 'unclip[{name}]' (or remove it from report_to)"
            )


def numeric_entries(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a row (step excluded), as floats."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def rgb_pixels(path: str) -> Any:
    """uint8 [H, W, 3] pixels of a local image file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def local_file(path: str, folder: str) -> str:
    """``path`` itself when local, else a copy of it in ``folder`` (trackers upload local files)."""
    fs, p = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return p
    local = os.path.join(folder, os.path.basename(p))
    fs.get(p, local)
    return local


def tagged(row: dict[str, Any]) -> dict[str, float]:
    """:func:`numeric_entries` under the names every tracker shows: a row's own group, else ``train/``."""
    return {(k if "/" in k else f"train/{k}"): v for k, v in numeric_entries(row).items()}


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``{run_dir}/tensorboard``.

    Event files are written locally and copied to a remote run folder at each flush (object
    stores cannot append). A resume purges the events after its checkpoint's step, which the
    run logs again.
    """

    def __init__(self, run_dir: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.target = f"{run_dir}/{TENSORBOARD_DIRNAME}"
        fs, path = url_to_fs(self.target)
        self.remote = None if isinstance(fs, LocalFileSystem) else (fs, path)
        local = tempfile.mkdtemp(prefix="unclip-tb-") if self.remote else path
        # a resume from the checkpoint of step s logs s + 1 onwards again: drop what followed s
        self.writer = SummaryWriter(
            log_dir=local, purge_step=start_step + 1 if start_step else None
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        for tag, value in tagged(row).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_images(self, step: int, images: dict[str, str]) -> None:
        for tag, path in images.items():
            self.writer.add_image(tag, rgb_pixels(path), global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            fs, path = self.remote
            fs.put(self.writer.log_dir.rstrip("/") + "/", path, recursive=True)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote is not None:
            shutil.rmtree(self.writer.log_dir, ignore_errors=True)


MLFLOW_ARTIFACTS = "mlflow-artifacts"


def _use_experiment(mlflow: Any, name: str, artifact_location: str) -> None:
    """Make the experiment ``name`` active, created with ``artifact_location`` if new."""
    found = mlflow.get_experiment_by_name(name)
    experiment_id = (
        found.experiment_id
        if found
        else mlflow.create_experiment(name, artifact_location=artifact_location)
    )
    mlflow.set_experiment(experiment_id=experiment_id)


class MlflowTracker:
    """An MLflow run named after the unclip run, with the trainer config as its parameters.

    The tracking server is MLflow's own setting (``MLFLOW_TRACKING_URI``); without one, a local
    run folder gets an SQLite store (``mlflow.db``) and its artifacts (``mlflow-artifacts/``)
    beside its checkpoints.
    """

    def __init__(self, run_dir: str, run_name: str, params: dict[str, Any]) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            fs, path = url_to_fs(run_dir)
            if isinstance(fs, LocalFileSystem):  # MLflow 3 keeps its file store for reads only
                mlflow.set_tracking_uri(f"sqlite:///{path}/mlflow.db")
                # An SQLite store's default experiment keeps artifacts in ./mlruns of whatever
                # folder the process runs in; this one keeps them in the run folder. (A run
                # resumed from a checkpoint that an older unclip logged to the default
                # experiment starts a new MLflow run here.)
                _use_experiment(mlflow, "unclip", os.path.join(path, MLFLOW_ARTIFACTS))
        self.mlflow = mlflow
        # a resumed run (or its evaluation) continues the MLflow run of the same name
        earlier = mlflow.search_runs(
            filter_string=f"attributes.run_name = '{run_name}'",
            output_format="list",
            max_results=1,
            search_all_experiments=False,
        )
        if earlier:
            self.run = mlflow.start_run(run_id=earlier[0].info.run_id)
        else:
            self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(tagged(row), step=step)

    def log_images(self, step: int, images: dict[str, str]) -> None:
        for tag, path in images.items():
            self.mlflow.log_artifact(path, artifact_path=f"{tag}/step_{step}")

    def flush(self) -> None:
        return None  # every call is sent when made

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    """A W&B run whose id is the unclip run name, so a resumed run continues the same W&B run.

    Project, entity and mode (``WANDB_MODE=offline``) are W&B's own settings.
    """

    def __init__(self, run_dir: str, run_name: str, params: dict[str, Any]) -> None:
        import wandb

        fs, path = url_to_fs(run_dir)
        local = path if isinstance(fs, LocalFileSystem) else tempfile.mkdtemp(prefix="unclip-wb-")
        os.makedirs(local, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "unclip"),
            name=run_name,
            id=run_name,
            resume="allow",
            dir=local,
            config=params,
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(tagged(row), step=step)

    def log_images(self, step: int, images: dict[str, str]) -> None:
        import wandb

        self.run.log({tag: wandb.Image(path) for tag, path in images.items()}, step=step)

    def flush(self) -> None:
        return None  # W&B syncs on its own thread

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service has written the run's records (an offline
        # run's .wandb file was seen holding its header alone), and its atexit teardown does not
        # run reliably in a Ray worker: wait for it here, unless this process has another run.
        if wandb.run is None:
            wandb.teardown()


class Trackers:
    """Every tracker of a run; each call goes to all of them."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def open(
        cls, names: list[str], run_dir: str, run_name: str, params: dict[str, Any], start: int
    ) -> Trackers:
        """The trackers named by ``trainer.report_to``, opened for a run starting at ``start``."""
        check_trackers(names)
        opened: list[Tracker] = []
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir, start))
            elif name == "mlflow":
                opened.append(MlflowTracker(run_dir, run_name, params))
            elif name == "wandb":
                opened.append(WandbTracker(run_dir, run_name, params))
            else:
                raise ValueError(f"trainer.report_to: unknown tracker {name!r}; one of {TRACKERS}")
        return cls(opened)

    def log(self, step: int, row: dict[str, Any]) -> None:
        """Send a logged row to every tracker."""
        for t in self.trackers:
            t.log(step, row)

    def log_images(self, step: int, images: dict[str, str]) -> None:
        """Send PNG files (tag → local path) to every tracker."""
        for t in self.trackers:
            t.log_images(step, images)

    def flush(self) -> None:
        """Flush every tracker (at a checkpoint)."""
        for t in self.trackers:
            t.flush()

    def close(self) -> None:
        """Close every tracker (end of the run)."""
        for t in self.trackers:
            t.close()


def report_evaluation(
    names: list[str],
    run_dir: str,
    run_name: str,
    step: int,
    metrics: dict[str, float],
    images: dict[str, str] | None = None,
) -> None:
    """An evaluation of a finished run into the run's trackers, at its last ``step``: the
    metrics as ``eval/…`` scalars and the images (tag → path) such as its sample grid."""
    if not names:
        return
    trackers = Trackers.open(names, run_dir, run_name, {"run_name": run_name}, 0)
    try:
        trackers.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        with tempfile.TemporaryDirectory(prefix="unclip-eval-") as tmp:
            local = {f"eval/{k}": local_file(v, tmp) for k, v in (images or {}).items()}
            trackers.log_images(step, local)
    finally:
        trackers.close()
