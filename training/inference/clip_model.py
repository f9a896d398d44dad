"""An open_clip CLIP as a diffusers pipeline component, saved in open_clip's own layout.

diffusers saves and loads a component through ``save_pretrained`` / ``from_pretrained`` when its
class derives from one of ``LOADABLE_CLASSES`` (here ``ModelMixin``); both are overridden so the
component's folder is what open_clip itself reads: ``open_clip_config.json`` (model and
preprocessing config) and ``open_clip_model.safetensors``, loadable with
``open_clip.create_model_and_transforms("local-dir:FOLDER")`` without unclip.
"""

from __future__ import annotations

import os
from typing import Any

import open_clip
import torch
from diffusers import ModelMixin

from unclip.datasets.clip import (
    CONFIG_NAME,
    ClipBundle,
    clip_id_of,
    clip_identity,
    preprocess_for,
    save_clip_model,
)
from unclip.datasets.clip_records import load_clip_from_record


class OpenClipModel(ModelMixin):
    """A loaded open_clip model with its config, tokenizer and identity (``clip_id``)."""

    def __init__(self, model: torch.nn.Module, model_cfg: dict[str, Any], tokenizer: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.model_cfg = dict(model_cfg)
        self.tokenizer = tokenizer
        self.clip_id = clip_id_of(clip_identity(model, self.model_cfg))

    @classmethod
    def from_bundle(cls, bundle: ClipBundle) -> OpenClipModel:
        """Wrap a CLIP loaded by unclip (``load_clip``); its identity must carry the model config."""
        model_cfg = bundle.identity.get("model_cfg")
        if not model_cfg:
            raise ValueError(f"CLIP {bundle.clip_id} has no open_clip model config in its identity")
        component = cls(bundle.model, model_cfg, bundle.tokenizer)
        if component.clip_id != bundle.clip_id:
            raise ValueError(f"CLIP {bundle.clip_id} hashes to {component.clip_id} once wrapped")
        return component

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> OpenClipModel:
        """The CLIP a clip record (``clip/{clip_id}/identity.json``) names, checked by its id."""
        return cls.from_bundle(load_clip_from_record(record))

    def bundle(self) -> ClipBundle:
        """This CLIP as the ``ClipBundle`` unclip's encoders take, on the component's device."""
        return ClipBundle(
            model=self.model,
            preprocess=preprocess_for(self.model),
            tokenizer=self.tokenizer,
            clip_id=self.clip_id,
            identity={"model_cfg": self.model_cfg},
            embed_dim=int(self.model_cfg["embed_dim"]),
            device=str(self.device),
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Write open_clip's ``local-dir:`` layout (config + safetensors) to ``save_directory``."""
        save_clip_model(self.model, self.model_cfg, os.fspath(save_directory))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        **_: Any,
    ) -> OpenClipModel:
        """Load a folder in open_clip's ``local-dir:`` layout through open_clip's own factory."""
        torch_dtype = dtype or torch_dtype
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise FileNotFoundError(f"{folder} is not an open_clip folder (no {CONFIG_NAME})")
        name = f"local-dir:{folder}"
        model = open_clip.create_model(name)
        model_cfg = open_clip.get_model_config(name)
        component = cls(model, model_cfg, open_clip.get_tokenizer(name))
        return component if torch_dtype is None else component.to(dtype=torch_dtype)
