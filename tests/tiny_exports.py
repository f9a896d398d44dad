"""A storage root whose CLIP, prior, decoder and upsampler are untrained tiny exports.

What the sampling, export and Python-API tests load: built in seconds, no training, no Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_YAML = """
clip: {embed_dim: 32, image_size: 32, patch_size: 8, vision_width: 64, vision_layers: 1,
       text_width: 64, text_layers: 1, heads: 2, context_length: 16}
prior: {num_layers: 1, num_attention_heads: 2, attention_head_dim: 16, timesteps: 100,
        sample_steps: 2}
decoder: {image_size: 16, block_out_channels: [16, 32], attention_head_dim: 8, timesteps: 100,
          sample_steps: 2}
upsampler: {input_size: 16, output_size: 32, block_out_channels: [16, 32], timesteps: 100,
            sample_steps: 2}
"""


def build_tiny_store(root: Path, config: Path) -> tuple[dict[str, str], int]:
    """Write ``config`` (storage under ``root``) and untrained exports that are both the latest
    and the promoted runs, plus ``up8``, an upsampler export that takes 8 px images (not the
    decoder's 16). Returns (export folder of each, CLIP embedding width)."""
    from unclip.datasets.clip import build_bootstrap_clip, load_clip, save_clip
    from unclip.datasets.clip_records import clip_record_path
    from unclip.datasets.storage import StorageLayout, write_json
    from unclip.pipelines.config import load_config
    from unclip.training.models.decoder import DecoderTask
    from unclip.training.models.prior import PriorTask
    from unclip.training.models.upsampler import UpsamplerTask

    config.write_text(f"storage: {root / 'store'}\n{CLIP_YAML}")
    cfg = load_config(config)
    layout = StorageLayout(cfg.storage)
    torch.manual_seed(0)
    clip_dir = save_clip(build_bootstrap_clip(cfg.clip), cfg.clip, str(root / "clip"))
    clip_id, dim = load_clip(cfg.clip, clip_dir).clip_id, cfg.clip.embed_dim
    common = {"layout": layout, "manifest_version": "v0", "holdout_fraction": 0.1, "dim": dim}
    tasks = {
        "prior": PriorTask(
            cfg=cfg.prior, clip_id=clip_id, image_mean=[0.0] * dim, image_std=[0.2] * dim, **common
        ),
        "decoder": DecoderTask(cfg=cfg.decoder, clip_id=clip_id, **common),
        "upsampler": UpsamplerTask(cfg=cfg.upsampler, clip_id=clip_id, **common),
        "up8": UpsamplerTask(
            cfg=cfg.upsampler.model_copy(update={"input_size": 8, "output_size": 16}),
            clip_id=clip_id,
            **common,
        ),
    }
    exports = {"clip": clip_dir}
    for name, task in tasks.items():
        exports[name] = str(root / name)
        task.export(task.build_model(), exports[name])
    bundle = load_clip(cfg.clip, clip_dir)
    write_json(clip_record_path(layout, clip_id), {"clip_id": clip_id, **bundle.identity})
    for model in ("clip", "prior", "decoder", "upsampler"):
        write_json(layout.latest_run(model), {"run": model, "export": exports[model]})
    for model in ("prior", "decoder", "upsampler"):  # promoted: the same runs
        record = {"model": model, "run": model, "export": exports[model], "metrics": {"m": 1.0}}
        write_json(layout.registry(model), record)
    return exports, dim
