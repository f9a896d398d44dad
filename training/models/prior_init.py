"""``prior.init_from``: a run that starts from a diffusers-format prior, checked against the config.

The folder may be a ``save_pretrained`` PriorTransformer or an unclip export; its config must
match the one this run would build (each mismatched key is named) and, for an export, its CLIP
must be the data set's. The sha256 of its files joins the run name.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from diffusers import PriorTransformer

from ..config import PriorConfig
from ..engine.artifacts import is_local, local_dir
from .prior_model import INFO_FILE, SUBFOLDER, TOKENS_KEY, build_prior

INIT_KEY = "prior.init_from"
# Where each PriorTransformer argument comes from, to name it in a mismatch (the rest are fixed
# by build_prior: the 4 additional tokens, the layer norms, the learned query).
_ARG_SOURCE = {
    "num_layers": "prior.num_layers",
    "num_attention_heads": "prior.num_attention_heads",
    "attention_head_dim": "prior.attention_head_dim",
    "embedding_dim": "the data set's embedding_dim",
    "num_embeddings": f"{TOKENS_KEY} (the CLIP's text context length, or 0)",
    "encoder_hid_proj_type": TOKENS_KEY,
}
_CONFIG_META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def init_model_dir(folder: str) -> str:
    """The PriorTransformer folder of a local ``folder``: itself, or an unclip export's ``prior/``."""
    for candidate in (folder, os.path.join(folder, SUBFOLDER)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"{INIT_KEY}: {folder} holds no PriorTransformer (neither config.json nor "
        f"{SUBFOLDER}/config.json, as save_pretrained or an unclip export writes)"
    )


def weights_digest(model_dir: str) -> str:
    """sha256 over the names and bytes of a saved model's files: its identity, wherever it lies."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_init_prior(
    path: str, cfg: PriorConfig, dim: int, clip_id: str, text_context: int = 0
) -> tuple[PriorTransformer, str]:
    """(the prior at ``path``, its weights digest), checked against the config and the data set.

    A clear error names ``prior.init_from``, the path and each mismatched key.
    """
    fs_path = path if not is_local(path) else os.path.abspath(path.removeprefix("file://"))
    if is_local(path) and not os.path.isdir(fs_path):
        raise FileNotFoundError(f"{INIT_KEY}: no such folder: {fs_path}")
    with local_dir(path) as d:
        model_dir = init_model_dir(d)
        info_path = os.path.join(d, INFO_FILE)
        if os.path.isfile(info_path):  # an unclip export says which CLIP it was trained on
            with open(info_path) as f:
                trained_on = json.load(f).get("clip_id")
            if trained_on and trained_on != clip_id:
                raise ValueError(
                    f"{INIT_KEY}: {path} was trained on embeddings of CLIP {trained_on}, "
                    f"but this data set's are of CLIP {clip_id}"
                )
        with open(os.path.join(model_dir, "config.json")) as f:
            theirs = json.load(f)
        with torch.device("meta"):  # only its config: allocate no weights
            ours = dict(build_prior(cfg, dim, np.zeros(dim), np.ones(dim), text_context).config)
        wrong = [
            f"{k} is {theirs.get(k)!r} there, {ours[k]!r} in {_ARG_SOURCE.get(k, 'unclip prior')}"
            for k in sorted(ours)
            if k not in _CONFIG_META and theirs.get(k, ours[k]) != ours[k]
        ]
        if wrong:
            raise ValueError(
                f"{INIT_KEY}: the prior at {path} does not match this run: " + "; ".join(wrong)
            )
        model = PriorTransformer.from_pretrained(model_dir, low_cpu_mem_usage=False)
        return model, weights_digest(model_dir)
