"""FID / KID features: the FID Inception network on images resized the clean-fid way.

FID is only comparable with published numbers when three things match (Parmar et al. 2022,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation"):

1. the network: the FID Inception-v3 (TensorFlow's ``pt_inception-2015-12-05`` graph, ported
   to PyTorch by torch-fidelity as ``FeatureExtractorInceptionV3``; torchmetrics' FID uses
   the same module), not torchvision's ImageNet Inception-v3, whose weights and layers differ;
2. the resize to 299×299: clean-fid's default, PIL bicubic on each channel as float32 with
   no quantization to uint8 afterwards (``cleanfid.resize.make_resizer("PIL", False,
   "bicubic", (299, 299))``);
3. the input scaling: (x − 128) / 128 on the 0–255 float image, then the 2048-d pool3 output.

The weights come from a file given by path or URI (``evaluate.inception_checkpoint``: no
download); its sha256 is recorded with every metric computed from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from unclip.datasets.storage import exists

from . import image_metrics as im

INCEPTION_SIZE = 299
FEATURES = "FID Inception-v3 pool3, 2048-d (torch-fidelity FeatureExtractorInceptionV3)"
RESIZE = "clean-fid: PIL bicubic per channel on float32 to 299x299, no quantization"
# The last module before the classifier: features are its flattened output.
_LAST_LAYER = "AvgPool"


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [size, size, 3], as clean-fid resizes (each channel in PIL's F mode)."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got {list(x.shape)}")
    channels = [
        np.asarray(
            Image.fromarray(x[:, :, c].astype(np.float32), mode="F").resize(
                (size, size), resample=Image.Resampling.BICUBIC
            )
        ).clip(0, 255)
        for c in range(3)
    ]
    return np.stack(channels, axis=2).astype(np.float32)


@dataclass
class FidInception:
    """The FID Inception network loaded from a weights file, and that file's sha256."""

    net: torch.nn.Module
    weights_sha256: str

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 images [N, H, W, 3] → 2048-d pool3 features [N, 2048] (float64)."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = np.stack([clean_resize(x) for x in images[i : i + batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            x = (x - 128) / 128
            for name, layer in self.net.named_children():
                x = layer(x)
                if name == _LAST_LAYER:
                    break
            out.append(torch.flatten(x, 1).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def protocol(self, num_generated: int, num_real: int) -> dict[str, Any]:
        """How an Inception-feature metric was computed: network, weights, resize, sample counts."""
        return {
            "features": FEATURES,
            "weights_sha256": self.weights_sha256,
            "resize": RESIZE,
            "num_generated": num_generated,
            "num_real": num_real,
        }


def load_fid_inception(weights: str) -> FidInception:
    """The FID Inception from a state-dict file (local path or fsspec URI), checked and hashed.

    The file is read once: hashed, then loaded with ``weights_only=True`` (tensors only, no
    pickled code), then handed to torch-fidelity's constructor as a local copy.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            "evaluate.inception_checkpoint is set but torch-fidelity is not installed: "
            "pip install 'unclip[eval]'"
        ) from e
    if not exists(weights):
        raise FileNotFoundError(f"evaluate.inception_checkpoint {weights} does not exist")
    with fsspec.open(weights, "rb") as f:
        data = f.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"evaluate.inception_checkpoint {weights} is not a plain state dict: {e}"
        ) from e
    classifier = state.get("fc.weight") if isinstance(state, dict) else None
    # The FID network's classifier has 1008 outputs; torchvision's ImageNet one has 1000.
    if classifier is None or tuple(classifier.shape) != (1008, 2048):
        raise ValueError(
            f"evaluate.inception_checkpoint {weights} is not the FID Inception's state dict "
            "(torch-fidelity's weights-inception-2015-12-05); torchvision's ImageNet "
            "Inception-v3 is another network and gives another score"
        )
    fd, local = tempfile.mkstemp(prefix="unclip-fid-inception-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=local
        )
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys or shapes
        raise ValueError(
            f"evaluate.inception_checkpoint {weights} does not fit the FID Inception: {e}"
        ) from e
    finally:
        os.unlink(local)
    return FidInception(net.eval(), hashlib.sha256(data).hexdigest())


def inception_scores(
    inception: FidInception | None,
    real: np.ndarray,
    trained: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
) -> dict[str, float | None]:
    """FID and KID of the trained and the untrained decoder's images against ``real`` (uint8).

    ``trained`` and ``baseline`` are the workers' results, each with its ``inception`` features;
    the features are pooled before any score is computed. All None without weights.
    """
    names = ("fid", "fid_untrained", "kid", "kid_std", "kid_untrained", "kid_untrained_std")
    if inception is None:
        return dict.fromkeys(names)
    real_features = inception.features(real)
    out: dict[str, float | None] = {}
    for suffix, results in (("", trained), ("_untrained", baseline)):
        generated = np.concatenate([r["inception"] for r in results])
        out[f"fid{suffix}"] = im.fd_of_features(generated, real_features)
        out[f"kid{suffix}"], out[f"kid{suffix}_std"] = im.kernel_distance(generated, real_features)
    return out
