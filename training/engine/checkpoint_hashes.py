"""Checkpoint files hashed at save and checked before load: a torn or swapped file is refused.

DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``, which can run
code. Each rank records the sha256 of every file it wrote into ``hashes/rank{r}.json`` of the
checkpoint; before anything is loaded, every listed file must match and no unlisted ``.pt``
file may be present. This catches corruption and files planted by whoever can write the runs
folder but not the hash records of the same save; it is no defence against someone who can
rewrite a whole checkpoint (the storage root is a trust boundary: docs/storage.md).
"""

from __future__ import annotations

import hashlib
import json
import os

HASH_DIR = "hashes"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for top, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(top, name), directory)
            if not rel.startswith(HASH_DIR + os.sep):
                out.append(rel)
    return sorted(out)


def record_hashes(directory: str, rank: int) -> None:
    """Write the sha256 of every file this rank put in ``directory`` (its part of a checkpoint)."""
    hashes = {rel: _sha256(os.path.join(directory, rel)) for rel in _files(directory)}
    os.makedirs(os.path.join(directory, HASH_DIR), exist_ok=True)
    with open(os.path.join(directory, HASH_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(hashes, f, indent=1, sort_keys=True)


def verify_hashes(directory: str) -> None:
    """Raise naming the file when a checkpoint file is unlisted, missing or changed."""
    record_dir = os.path.join(directory, HASH_DIR)
    if not os.path.isdir(record_dir):
        raise ValueError(
            f"checkpoint {directory} has no {HASH_DIR}/ records of what was saved, so it is not "
            "loaded; delete the checkpoint folder to start the run over"
        )
    listed: dict[str, str] = {}
    for name in sorted(os.listdir(record_dir)):
        with open(os.path.join(record_dir, name)) as f:
            listed.update(json.load(f))
    for rel in _files(directory):
        if rel not in listed and rel.endswith((".pt", ".pth", ".bin", ".pkl")):
            raise ValueError(f"checkpoint file {rel} in {directory} was not written by the run")
    for rel, digest in listed.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint file {rel} is missing from {directory}")
        if _sha256(path) != digest:
            raise ValueError(f"checkpoint file {rel} in {directory} changed since it was saved")
