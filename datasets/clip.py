"""open_clip models: the bootstrap architecture, open_clip-loadable checkpoints, and the CLIP identity.

Every model goes through open_clip's own loading code: a saved bootstrap checkpoint is a directory
in open_clip's hf-hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``) loaded
with ``local-dir:``; a pretrained model is ``create_model_and_transforms(name, pretrained=...)``
with a tag, an ``hf-hub:`` name or a local file. ``clip_id`` names what the embeddings were made
with, so two CLIPs never share an embeddings folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import open_clip
import torch
from fsspec.core import url_to_fs
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from .config import ClipConfig
from .storage import atomic_write

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
VOCAB_SIZE = 49408  # open_clip's default SimpleTokenizer (bpe_simple_vocab_16e6.txt.gz)


@dataclass
class ClipBundle:
    """A loaded CLIP with its preprocessing, tokenizer and identity."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    clip_id: str
    identity: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0
    device: str = "cpu"


RESNET_STRIDE = 32  # ModifiedResNet: stem 4x, then stages of stride 1, 2, 2, 2
RESNET_HEAD_WIDTH = 64  # its attention pool's head width, as in open_clip's RN50


def bootstrap_model_config(cfg: ClipConfig) -> dict[str, Any]:
    """The bootstrap architecture as an open_clip model config dict (the model_configs/*.json format)."""
    # The ResNet tower's attention pool has heads of its own width (RESNET_HEAD_WIDTH).
    widths = ["text_width"] + (["vision_width"] if cfg.vision_tower == "vit" else [])
    uneven = [f"{w} ({getattr(cfg, w)})" for w in widths if getattr(cfg, w) % cfg.heads]
    if uneven:
        raise ValueError(f"clip: {' and '.join(uneven)} must be divisible by heads ({cfg.heads})")
    if cfg.vision_tower == "resnet":
        if cfg.image_size % RESNET_STRIDE:
            raise ValueError(
                f"clip: image_size ({cfg.image_size}) must be divisible by {RESNET_STRIDE} "
                "with vision_tower: resnet (its last feature map is image_size / 32 on a side)"
            )
        vision = {  # open_clip's ModifiedResNet: a list of stage depths selects it
            "image_size": cfg.image_size,
            "layers": [cfg.vision_layers] * 4,
            "width": cfg.vision_width,
            "head_width": RESNET_HEAD_WIDTH,
        }
    elif cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"clip: image_size ({cfg.image_size}) must be divisible by patch_size ({cfg.patch_size})"
        )
    else:
        vision = {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "head_width": cfg.vision_width // cfg.heads,
            "patch_size": cfg.patch_size,
        }
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": VOCAB_SIZE,
            "width": cfg.text_width,
            "heads": cfg.heads,
            "layers": cfg.text_layers,
        },
        # logit_scale as shape [1], not a 0-dim tensor: DeepSpeed broadcasts parameters as
        # uint8 views, which 0-dim tensors cannot be.
        "nonscalar_logit_scale": True,
    }


def bootstrap_config_of(model_cfg: dict[str, Any], **kw: Any) -> ClipConfig:
    """The ``ClipConfig`` whose ``bootstrap_model_config`` is ``model_cfg`` (and ``kw``)."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    resnet = isinstance(v["layers"], list | tuple)
    vision = (
        {"vision_tower": "resnet", "vision_layers": v["layers"][0]}
        if resnet
        else {"patch_size": v["patch_size"], "vision_layers": v["layers"]}
    )
    return ClipConfig(
        embed_dim=model_cfg["embed_dim"],
        image_size=v["image_size"],
        vision_width=v["width"],
        text_width=t["width"],
        text_layers=t["layers"],
        heads=t["heads"],
        context_length=t["context_length"],
        **vision,
        **kw,
    )


def bootstrap_preprocess_config(cfg: ClipConfig) -> dict[str, Any]:
    """open_clip's default preprocessing at the bootstrap image size."""
    return asdict(PreprocessCfg(size=cfg.image_size))


def build_bootstrap_clip(cfg: ClipConfig) -> torch.nn.Module:
    """An untrained open_clip ``CLIP`` of the bootstrap architecture (seed torch before calling)."""
    model = open_clip.CLIP(**bootstrap_model_config(cfg))
    open_clip.set_model_preprocess_cfg(model, bootstrap_preprocess_config(cfg))
    return model


def model_config_of(cfg: ClipConfig) -> dict[str, Any]:
    """The open_clip model config of ``cfg``: the bootstrap one, or the named model's."""
    p = cfg.pretrained
    if p and (p.startswith("hf-hub:") or os.path.isdir(p)):
        name = p if p.startswith("hf-hub:") else f"local-dir:{p}"
    elif cfg.model_name is None:
        return bootstrap_model_config(cfg)
    else:
        name = cfg.model_name if ":" in cfg.model_name else cfg.model_name.replace("/", "-")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"clip: unknown open_clip model {name!r}")
    return model_cfg


def save_clip(model: torch.nn.Module, cfg: ClipConfig, directory: str) -> str:
    """Write ``model`` as a directory open_clip loads with ``local-dir:``; atomic; returns it."""
    return save_clip_model(model, model_config_of(cfg), directory)


def save_clip_model(model: torch.nn.Module, model_cfg: dict[str, Any], directory: str) -> str:
    """Write ``model`` of open_clip config ``model_cfg`` in open_clip's hf-hub layout; atomic."""
    import safetensors.torch

    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    # The same keys open_clip's push_to_hf_hub.save_config_for_hf writes.
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            k: preprocess_cfg[k]
            for k in ("mean", "std", "interpolation", "resize_mode")
            if k in preprocess_cfg
        },
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = safetensors.torch.save(tensors)
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()

    fs, path = url_to_fs(directory)
    if "://" not in directory or directory.startswith("file://"):
        # Local: write a sibling folder, then swap it in with renames.
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        try:
            with open(os.path.join(tmp, WEIGHTS_NAME), "wb") as f:
                f.write(weights)
            with open(os.path.join(tmp, CONFIG_NAME), "wb") as f:
                f.write(config_bytes)
            old = None
            if os.path.exists(path):
                old = f"{path}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
            os.rename(tmp, path)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return path
    # Remote: each file atomically, the config last (a directory is complete when it has one).
    base = directory.rstrip("/")
    with atomic_write(f"{base}/{WEIGHTS_NAME}") as f:
        f.write(weights)
    with atomic_write(f"{base}/{CONFIG_NAME}") as f:
        f.write(config_bytes)
    return base


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the same weights from any file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clip_identity(model: torch.nn.Module, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What makes two CLIPs give the same embeddings: architecture, weights, preprocessing."""
    pp = dict(open_clip.get_model_preprocess_cfg(model))
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
    if isinstance(pp.get("size"), int):  # open_clip stores (h, w) or an int, meaning the same
        pp["size"] = [pp["size"], pp["size"]]
    return {"model_cfg": model_cfg, "weights_sha256": weights_sha256(model), "preprocess_cfg": pp}


def clip_id_of(identity: dict[str, Any]) -> str:
    """Short content hash of a CLIP identity."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _local_dir(checkpoint: str) -> Iterator[str]:
    """A local path for a checkpoint directory (remote ones are copied to a temp dir)."""
    if "://" not in checkpoint or checkpoint.startswith("file://"):
        yield url_to_fs(checkpoint)[1]
        return
    fs, path = url_to_fs(checkpoint)
    tmp = tempfile.mkdtemp(prefix="unclip-clip-")
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            fs.get(f"{path.rstrip('/')}/{name}", os.path.join(tmp, name))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Seed of a named model's random initialisation (``pretrained`` unset): every process that loads
# it gets the same weights, hence one clip_id, as a loaded checkpoint would.
RANDOM_INIT_SEED = 0


def _load_named(name: str, pretrained: str | None, device: str) -> tuple[Any, Any, Any, dict]:
    with torch.random.fork_rng(devices=[]):
        if pretrained is None:
            torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
    model_cfg = open_clip.get_model_config(name if ":" in name else name.replace("/", "-"))
    if model_cfg is None:
        raise ValueError(f"clip: unknown open_clip model {name!r}")
    return model, preprocess, open_clip.get_tokenizer(name), model_cfg


def load_clip(cfg: ClipConfig, checkpoint: str | None = None, device: str = "cpu") -> ClipBundle:
    """Load a save_clip directory, else ``cfg.model_name`` / ``cfg.pretrained`` through open_clip.

    ``pretrained`` may be an open_clip tag, ``hf-hub:org/name`` (open_clip's own schema, which
    then names the model too), a local directory in the hf-hub layout, or a local weights file;
    with ``model_name`` unset a weights file is read into the bootstrap architecture.
    """
    pretrained = cfg.pretrained
    if checkpoint is not None:
        with _local_dir(checkpoint) as local:
            if not os.path.isfile(os.path.join(local, CONFIG_NAME)):
                raise FileNotFoundError(
                    f"clip checkpoint {checkpoint!r} has no {CONFIG_NAME} (not written by save_clip?)"
                )
            model, preprocess, tokenizer, model_cfg = _load_named(
                f"local-dir:{local}", None, device
            )
        source = checkpoint
    elif pretrained and (pretrained.startswith("hf-hub:") or os.path.isdir(pretrained)):
        name = pretrained if pretrained.startswith("hf-hub:") else f"local-dir:{pretrained}"
        model, preprocess, tokenizer, model_cfg = _load_named(name, None, device)
        source = pretrained
    elif cfg.model_name is not None:
        model, preprocess, tokenizer, model_cfg = _load_named(cfg.model_name, pretrained, device)
        source = f"{cfg.model_name}:{pretrained}"
    elif pretrained and os.path.isfile(pretrained):
        model = build_bootstrap_clip(cfg)
        open_clip.load_checkpoint(model, pretrained)
        model.to(device)
        preprocess = preprocess_for(model)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
        model_cfg = bootstrap_model_config(cfg)
        source = pretrained
    else:
        raise ValueError(
            "clip: no checkpoint and no model_name; train the bootstrap CLIP first "
            "(or set clip.model_name and clip.pretrained)"
        )
    model.eval()
    identity = clip_identity(model, model_cfg)
    identity_out = {**identity, "source": source}
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        clip_id=clip_id_of(identity),
        identity=identity_out,
        embed_dim=int(model_cfg["embed_dim"]),
        device=device,
    )


def preprocess_for(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The eval-time transform open_clip would build for ``model``."""
    return image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False
    )


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: Sequence[Image.Image]) -> np.ndarray:
    """L2-normalised image embeddings, float32 [N, D]."""
    if not images:
        return np.zeros((0, bundle.embed_dim), np.float32)
    x = torch.stack([bundle.preprocess(im) for im in images]).to(bundle.device)
    return bundle.model.encode_image(x, normalize=True).float().cpu().numpy()


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str]) -> np.ndarray:
    """L2-normalised text embeddings, float32 [N, D]."""
    if not texts:
        return np.zeros((0, bundle.embed_dim), np.float32)
    tokens = bundle.tokenizer(list(texts)).to(bundle.device)
    return bundle.model.encode_text(tokens, normalize=True).float().cpu().numpy()
