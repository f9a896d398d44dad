"""The pipeline's stages as plain functions of the config.

Each stage finds its inputs in the storage root, does only the work that is missing, and
returns a small JSON-able summary. Dagster assets (``assets.py``) and the CLI's single-stage
commands both call these, so a stage behaves the same whichever way it is launched.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets import embed as embed_mod
from unclip.datasets import ingest as ingest_mod
from unclip.datasets import manifest as manifest_mod
from unclip.datasets import synthetic, url_lists
from unclip.datasets.ingest_stats import format_summary
from unclip.datasets.readers import holdout_captions, load_manifest, require_images
from unclip.datasets.shards import completed_shards
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json
from unclip.pipelines import sources as sources_mod
from unclip.pipelines.config import PipelineConfig
from unclip.training.config import SHAPE_CAPTIONS

Progress = Callable[[int, int], None]

SYNTHETIC_LIST = "urls.parquet"


def layout_of(cfg: PipelineConfig) -> StorageLayout:
    return StorageLayout(cfg.storage)


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start an embedded Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)


# --- data ---------------------------------------------------------------------------------


def synthetic_list_path(cfg: PipelineConfig) -> str:
    # Not under incoming/: that is the sensor's inbox.
    return layout_of(cfg).join("synthetic", SYNTHETIC_LIST)


def url_lists_of(cfg: PipelineConfig) -> list[sources_mod.ConfiguredList]:
    """Every URL list of this run: configured sources (globs expanded), plus the synthetic list."""
    lists = sources_mod.configured_lists(cfg)
    if cfg.synthetic is not None:
        lists.append(sources_mod.ConfiguredList(synthetic_list_path(cfg), {}))
    if not lists:
        raise ValueError("config has no `sources` and no `synthetic` section: nothing to ingest")
    return lists


def prepare_sources(cfg: PipelineConfig) -> dict[str, Any]:
    """Write the synthetic URL list (once; its server port is fixed by the first write)."""
    lists = url_lists_of(cfg)
    out: dict[str, Any] = {"sources": len(lists)}
    if cfg.synthetic is not None:
        path = synthetic_list_path(cfg)
        if not exists(path):
            with synthetic.serve_synthetic(cfg.synthetic) as base_url:
                synthetic.write_url_list(cfg.synthetic, base_url, path)
        out["synthetic_list"] = path
        out["synthetic_pairs"] = cfg.synthetic.num_pairs
    for listed in lists:
        if not exists(listed.path):
            raise FileNotFoundError(f"sources: URL list {listed.path} does not exist")
    return out


def register_sources(cfg: PipelineConfig) -> list[str]:
    """Write the synthetic list if needed and register every configured list; their ids."""
    prepare_sources(cfg)
    return [sources_mod.register(cfg, lst.path, lst.options) for lst in url_lists_of(cfg)]


def source_lists(cfg: PipelineConfig, only: list[str] | None = None) -> dict[str, str]:
    """Source id → URL list: configured lists plus those the inbox sensor registered.

    ``only`` restricts to those ids (one partition's run); an unknown id is an error.
    """
    if only is not None:
        return {sid: sources_mod.url_list_of(cfg, sid) for sid in only}
    known = sources_mod.registered(cfg)
    # A registered list is not hashed again (lists can be large, on S3); `unclip run`
    # re-registers the configured ones, so one edited in place gets its new id there.
    seen = set(known.values())
    for listed in url_lists_of(cfg):
        if listed.path not in seen and exists(listed.path):
            known.setdefault(url_lists.source_id(listed.path), listed.path)
    return dict(sorted(known.items()))


def source_ids(cfg: PipelineConfig) -> list[str]:
    return list(source_lists(cfg))


def describe_source(cfg: PipelineConfig, sid: str) -> dict[str, Any]:
    """Check one source's list (columns, rows) before anything is downloaded."""
    path = sources_mod.url_list_of(cfg, sid)
    checked = sources_mod.validate(path, cfg, sources_mod.ingest_config_of(cfg, sid, path))
    return {"source": sid, "url_list": path, "rows": checked.rows}


@contextlib.contextmanager
def _synthetic_server_if_needed(cfg: PipelineConfig, url_list: str) -> Iterator[None]:
    """Serve the synthetic images on the list's own port while its shards download."""
    if cfg.synthetic is None or url_list != synthetic_list_path(cfg):
        yield
        return
    with synthetic.serve_synthetic(cfg.synthetic, port=synthetic.url_list_port(url_list) or 0):
        yield


def ingest(
    cfg: PipelineConfig,
    progress: Progress | None = None,
    retry_failed: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Download the missing shards of every source, or of the ``only`` ones (img2dataset on Ray).

    With ``retry_failed``, also re-download the failed samples of finished shards into new
    shards, leaving the successful ones untouched.
    """
    ensure_ray(cfg)
    layout = layout_of(cfg)
    results = []
    for sid, path in source_lists(cfg, only).items():
        runs = []
        icfg = sources_mod.ingest_config_of(cfg, sid, path)
        if not ingest_mod.source_complete(layout, path, icfg):
            with _synthetic_server_if_needed(cfg, path):
                runs.append(ingest_mod.ingest_source(layout, path, icfg, progress=progress))
        if retry_failed:
            with _synthetic_server_if_needed(cfg, path):
                runs.append(ingest_mod.retry_failed(layout, sid, icfg, progress=progress))
        if not runs:
            results.append({"source": sid, "shards_written": 0, "skipped": True})
        for r in runs:
            results.append(
                {
                    "source": r.source_id,
                    "shards_written": r.shards_written,
                    "shards_skipped": r.shards_skipped,
                    "successes": r.successes,
                    "failures": r.failures,
                    "failed_shards": r.failed_shards,
                    "warnings": r.warnings,
                    "summary": format_summary(r.stats),
                }
            )
    failed = {r["source"]: r["failed_shards"] for r in results if r.get("failed_shards")}
    if failed:
        # Finished shards are kept; the next run retries only these.
        lines = [
            f"  source {s} shard {n:05d}: {err}"
            for s, shards in failed.items()
            for n, err in shards.items()
        ]
        raise IngestFailed(
            "shards failed after Ray retries (re-run to retry them):\n" + "\n".join(lines)
        )
    return {
        "sources": results,
        "shards_written": sum(r["shards_written"] for r in results),
    }


class IngestFailed(RuntimeError):
    """Some shards could not be downloaded; the ones that were are committed and kept."""


# --- CLIP and embeddings --------------------------------------------------------------------


def clip_checkpoint(cfg: PipelineConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The CLIP that embeds this run's data: pretrained as configured, else the bootstrap one.

    The bootstrap CLIP is pinned: it is trained on the sources ingested when it is first
    needed, and ``runs/clip/latest.json`` records them. Later sources are embedded with it
    rather than retraining it (which would change ``clip_id`` and re-embed every source);
    ``unclip run --retrain-clip`` (or deleting that file) trains a new one on all sources.
    """
    if not cfg.uses_bootstrap_clip:
        return {"checkpoint": None, "bootstrap": False, "clip_id": clip_id_for(cfg, None)}
    from unclip.training.models.bootstrap_clip import train_bootstrap_clip

    ensure_ray(cfg)
    layout = layout_of(cfg)
    pin = read_json(layout.latest_run("clip")) if exists(layout.latest_run("clip")) else {}
    trained_on = pin.get("sources") or ingested_sources(cfg)
    if not trained_on:
        raise ValueError(
            "the bootstrap CLIP trains on ingested pairs, and no source is ingested yet: "
            "materialize image_shards first (unclip ingest)"
        )
    fit = train_bootstrap_clip(
        layout, cfg.clip, cfg.bootstrap, trained_on, cfg.evaluate.holdout_fraction
    )
    if pin.get("run") != fit.run_name or not pin.get("clip_id"):
        clip_id = clip_id_for(cfg, fit.export_dir)
        write_json(
            layout.latest_run("clip"),
            {
                "run": fit.run_name,
                "export": fit.export_dir,
                "dataset_version": None,
                "sources": sorted(trained_on),
                "clip_id": clip_id,
            },
        )
    else:
        clip_id = pin["clip_id"]
    return {
        "checkpoint": fit.export_dir,
        "bootstrap": True,
        "run": fit.run_name,
        "skipped": fit.skipped,
        "clip_id": clip_id,
        "trained_on_sources": len(trained_on),
        **_scalars(fit.metrics),
    }


def unpin_clip(cfg: PipelineConfig) -> bool:
    """Forget the pinned bootstrap CLIP, so the next run trains one on every source."""
    path = layout_of(cfg).latest_run("clip")
    if not exists(path):
        return False
    fs, p = url_to_fs(path)
    fs.rm(p)
    return True


def ingested_sources(cfg: PipelineConfig) -> list[str]:
    """Sources whose every planned shard is committed."""
    layout = layout_of(cfg)
    out = []
    for sid in source_lists(cfg):
        if exists(layout.ingest_plan(sid)):
            plan = read_json(layout.ingest_plan(sid))
            total = math.ceil(plan["num_rows"] / plan["samples_per_shard"])
            if set(range(total)) <= set(completed_shards(layout, sid)):
                out.append(sid)
    return out


def clip_id_for(cfg: PipelineConfig, checkpoint: str | None) -> str:
    """The id the embeddings of this CLIP are filed under (loads the model once)."""
    from unclip.datasets.clip import load_clip

    return load_clip(cfg.clip, checkpoint).clip_id


def embed(
    cfg: PipelineConfig, clip_ckpt: str | None, only: list[str] | None = None
) -> dict[str, Any]:
    """Embed the image shards of every source (or the ``only`` ones) that have no embeddings."""
    ensure_ray(cfg)
    layout = layout_of(cfg)
    written = skipped = 0
    clip_id = None
    for sid in source_lists(cfg, only):
        r = embed_mod.embed_source(layout, sid, cfg.clip, clip_ckpt, cfg.embed)
        written += r.shards_written
        skipped += r.shards_skipped
        clip_id = r.clip_id
    return {"clip_id": clip_id, "shards_written": written, "shards_skipped": skipped}


def current_version(cfg: PipelineConfig) -> str:
    """The dataset version assembled last (what training and evaluation use)."""
    m = manifest_mod.latest_manifest(layout_of(cfg))
    if m is None:
        raise FileNotFoundError(
            f"no dataset manifest under {cfg.storage}: materialize dataset_manifest first "
            "(unclip embed)"
        )
    return m["version"]


def assemble(cfg: PipelineConfig, clip_id: str) -> dict[str, Any]:
    """The manifest over every source with embeddings of ``clip_id``."""
    m = manifest_mod.assemble_manifest(layout_of(cfg), clip_id, source_ids(cfg), cfg=cfg.manifest)
    return {
        "version": m["version"],
        "num_samples": m["num_samples"],
        "num_shards": len(m["shards"]),
        "embedding_dim": m["embedding_dim"],
    }


# --- training and evaluation ----------------------------------------------------------------


def train_prior(cfg: PipelineConfig, version: str) -> dict[str, Any]:
    from unclip.training.models.prior import train_prior as fit_prior

    ensure_ray(cfg)
    fit = fit_prior(layout_of(cfg), version, cfg.prior, cfg.evaluate.holdout_fraction)
    _record_latest(cfg, "prior", fit, version)
    return _fit_summary(fit)


def train_decoder(cfg: PipelineConfig, version: str) -> dict[str, Any]:
    from unclip.training.models.decoder import train_decoder as fit_decoder

    require_images(load_manifest(layout_of(cfg), version))  # before any worker starts
    ensure_ray(cfg)
    fit = fit_decoder(layout_of(cfg), version, cfg.decoder, cfg.evaluate.holdout_fraction)
    _record_latest(cfg, "decoder", fit, version)
    return _fit_summary(fit)


def train_upsampler(cfg: PipelineConfig, version: str) -> dict[str, Any]:
    """Train the super-resolution stage, when the config has an ``upsampler`` section."""
    if cfg.upsampler is None:
        return {"run": None, "skipped": True, "reason": "no upsampler section in the config"}
    if cfg.upsampler.input_size != cfg.decoder.image_size:
        raise ValueError(
            f"upsampler.input_size {cfg.upsampler.input_size} must equal decoder.image_size "
            f"{cfg.decoder.image_size}: the upsampler enlarges the decoder's images"
        )
    from unclip.training.models.upsampler import train_upsampler as fit_upsampler

    require_images(load_manifest(layout_of(cfg), version))
    ensure_ray(cfg)
    fit = fit_upsampler(layout_of(cfg), version, cfg.upsampler, cfg.evaluate.holdout_fraction)
    _record_latest(cfg, "upsampler", fit, version)
    return _fit_summary(fit)


def _record_latest(cfg: PipelineConfig, model: str, fit: Any, version: str | None) -> None:
    """Point ``runs/{model}/latest.json`` at this run, for ``unclip sample`` and ``status``."""
    path = layout_of(cfg).latest_run(model)
    record = {"run": fit.run_name, "export": fit.export_dir, "dataset_version": version}
    # Unchanged on a skipped run: a re-run writes nothing.
    if not exists(path) or read_json(path) != record:
        write_json(path, record)


def latest_export(cfg: PipelineConfig, model: str) -> str:
    path = layout_of(cfg).latest_run(model)
    if not exists(path):
        raise FileNotFoundError(
            f"no trained {model} under {cfg.storage} ({path} is missing): run `unclip run` or "
            f"`unclip train {model}` first"
        )
    return read_json(path)["export"]


def _fit_summary(fit: Any) -> dict[str, Any]:
    return {
        "run": fit.run_name,
        "run_dir": fit.run_dir,
        "export": fit.export_dir,
        "skipped": fit.skipped,
        **_scalars(fit.metrics),
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}


def evaluate(cfg: PipelineConfig, version: str, clip_ckpt: str | None) -> dict[str, Any]:
    """Prior cosine suite, then the whole cascade's metrics, sample grids and HTML report under ``eval/``.

    The cascade (prior → decoder → upsampler when configured) is judged on held-out captions:
    FD-CLIP against an untrained decoder's, CLIP score against real images', the synthetic
    shapes' attribute accuracy and, with an Inception checkpoint, FID
    (``eval/{decoder_run}/decoder_metrics.json`` and ``report.html``). Each output is skipped
    when it is already there.
    """
    from unclip.training.evaluation.cascade_eval import METRICS_FILE, REPORT_FILE, evaluate_cascade
    from unclip.training.evaluation.prior_eval import evaluate_prior, write_sample_grid
    from unclip.training.models.decoder import train_decoder as fit_decoder
    from unclip.training.models.prior import train_prior as fit_prior

    ensure_ray(cfg)
    layout = layout_of(cfg)
    holdout = cfg.evaluate.holdout_fraction
    # Every fit is finished by now: these calls only look their exports up.
    prior_fit = fit_prior(layout, version, cfg.prior, holdout)
    decoder_fit = fit_decoder(layout, version, cfg.decoder, holdout)
    upsampler_fit = None
    if cfg.upsampler is not None:
        from unclip.training.models.upsampler import train_upsampler as fit_upsampler

        upsampler_fit = fit_upsampler(layout, version, cfg.upsampler, holdout)

    metrics_path = layout.join("eval", prior_fit.run_name, "prior_metrics.json")
    prior_metrics = read_json(metrics_path) if exists(metrics_path) else {}
    # Sampling keys are not part of the run name: metrics drawn with other settings are stale.
    sampling = {
        "sample_steps": cfg.prior.sample_steps,
        "guidance_scale": cfg.prior.guidance_scale,
        "candidates": cfg.prior.candidates,
    }
    # Metrics without their context (split, CLIP) cannot be compared at promotion: redo them.
    if any(prior_metrics.get(k) != v for k, v in sampling.items()) or "split" not in prior_metrics:
        prior_metrics = evaluate_prior(
            layout, version, prior_fit, cfg.evaluate, holdout, prior_cfg=cfg.prior
        )

    grid = layout.join("eval", decoder_fit.run_name, "samples.png")
    if not exists(grid):
        captions = grid_captions(cfg, version)
        write_sample_grid(
            layout,
            cfg.clip,
            clip_ckpt,
            prior_fit.export_dir,
            decoder_fit.export_dir,
            cfg.evaluate.model_copy(update={"captions": captions}),
            grid,
        )
    cascade: dict[str, Any] = {}
    loss_curves = {
        f"prior {prior_fit.run_name}": f"{prior_fit.run_dir}/loss.png",
        f"decoder {decoder_fit.run_name}": f"{decoder_fit.run_dir}/loss.png",
    }
    if upsampler_fit is not None:
        cascade["upsampler_exports"] = [upsampler_fit.export_dir]
        loss_curves[f"upsampler {upsampler_fit.run_name}"] = f"{upsampler_fit.run_dir}/loss.png"
    decoder_metrics = evaluate_cascade(
        layout,
        version,
        cfg.clip,
        clip_ckpt,
        prior_fit,
        decoder_fit,
        cfg.decoder,
        cfg.evaluate,
        palette=synthetic_palette(cfg),
        cascade=cascade,
        prior_metrics=prior_metrics,
        loss_curves=loss_curves,
        extra_images={"Sample grid (evaluate.captions, prior → decoder)": grid},
    )
    eval_dir = layout.eval_dir(decoder_fit.run_name)
    if upsampler_fit is not None:
        # The upsampler is judged by the same cascade metrics (the promotion gate reads them here).
        up_path = layout.join("eval", upsampler_fit.run_name, "upsampler_metrics.json")
        if not exists(up_path) or read_json(up_path) != decoder_metrics:
            write_json(up_path, decoder_metrics)
    return {
        "prior_metrics": metrics_path,
        "sample_grid": grid,
        "decoder_metrics": f"{eval_dir}/{METRICS_FILE}",
        "report": f"{eval_dir}/{REPORT_FILE}",
        **_scalars(prior_metrics),
        **{k: v for k, v in _scalars(decoder_metrics).items() if k in DECODER_SUMMARY},
    }


def grid_captions(cfg: PipelineConfig, version: str) -> list[str]:
    """The sample grid's captions: ``evaluate.captions``, else the shapes' (synthetic set on),
    else the first distinct held-out captions of the dataset version."""
    if cfg.evaluate.captions is not None:
        return list(cfg.evaluate.captions)
    if cfg.synthetic is not None:
        return list(SHAPE_CAPTIONS)
    manifest = load_manifest(layout_of(cfg), version)
    return holdout_captions(
        layout_of(cfg), manifest, cfg.evaluate.holdout_fraction, len(SHAPE_CAPTIONS)
    )


DECODER_SUMMARY = (
    "attribute_accuracy",
    "fd_clip",
    "fd_clip_untrained",
    "clip_score",
    "clip_score_real",
    "fid",
)


def synthetic_palette(cfg: PipelineConfig) -> dict[str, tuple[int, int, int]] | None:
    """Colour name → RGB of the synthetic shapes, for the attribute check (None: no synthetic data)."""
    if cfg.synthetic is None:
        return None
    from PIL import ImageColor

    return {c: synthetic.PALETTE.get(c) or ImageColor.getrgb(c)[:3] for c in cfg.synthetic.colors}
