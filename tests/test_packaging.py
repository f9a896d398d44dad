"""pyproject.toml: the `ui` extra never moves Dagster, and libraries whose internals unclip imports
are bounded to the tested series."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from shrunk_config import REPO

tomllib = pytest.importorskip("tomllib")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CODE = ("datasets", "training", "pipelines")
# Packages whose submodules are their documented public API (pyarrow.parquet, ray.train, …).
PUBLIC_SUBMODULES = {
    "pyarrow",
    "fsspec",
    "ray",
    "torch",
    "torchvision",
    "torchmetrics",
    "pydantic",
    "PIL",
    "rich",
}


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    lines = PYPROJECT["optional-dependencies"][extra] if extra else PYPROJECT["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _internal_imports() -> dict[str, set[str]]:
    """Top-level package → the submodules unclip imports from it (``from pkg.sub import x``)."""
    found: dict[str, set[str]] = {}
    pattern = re.compile(r"^\s*from ([A-Za-z_]\w*)\.([\w.]+) import", re.MULTILINE)
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            for pkg, sub in pattern.findall(path.read_text()):
                found.setdefault(pkg, set()).add(sub)
    return found


def test_dagster_and_its_webserver_are_resolved_together():
    base, ui = _requirements(), _requirements("ui")
    # dagster-webserver X.Y.Z pins dagster==X.Y.Z and is released after dagster: when only
    # the extra names it, adding the extra moves dagster back to the webserver's release.
    assert {"dagster", "dagster-webserver"} <= set(base)
    assert base["dagster"].specifier == base["dagster-webserver"].specifier
    assert ui["dagster-webserver"].specifier == base["dagster-webserver"].specifier
    for extra in ("ui", "test", "eval"):
        for name, req in _requirements(extra).items():
            if name in base:  # an extra may repeat a base requirement, never narrow it
                assert req.specifier == base[name].specifier, (extra, name)


def test_installed_dagster_matches_its_webserver_and_the_ranges():
    base = _requirements()
    versions = {name: metadata.version(name) for name in ("dagster", "dagster-webserver")}
    assert versions["dagster"] == versions["dagster-webserver"]
    for name, version in versions.items():
        assert Version(version) in base[name].specifier, (name, version)


def test_libraries_whose_internals_unclip_imports_are_bounded_to_the_tested_series():
    base = _requirements()
    dists = metadata.packages_distributions()
    internals = {
        canonicalize_name(dists[pkg][0])
        for pkg in _internal_imports()
        if pkg not in PUBLIC_SUBMODULES and pkg in dists
    }
    # img2dataset (Downloader, Resizer, WebDatasetSampleWriter) and open_clip (transform, loss).
    assert {"img2dataset", "open-clip-torch"} <= internals
    for name in internals & set(base):
        spec = base[name].specifier
        uppers = [s for s in spec if s.operator in ("<", "<=", "==", "~=")]
        assert uppers, f"{name}{spec}: unclip imports its internals, so it needs an upper bound"
        installed = Version(metadata.version(name))
        assert installed in spec, f"{name} {installed} is outside {spec}: test the new series"


@pytest.mark.skipif(
    not os.environ.get("UNCLIP_PIP_RESOLVE"),
    reason="resolves against the package index (2 minutes): set UNCLIP_PIP_RESOLVE=1",
)
@pytest.mark.timeout(600)
def test_pip_resolves_the_ui_extra_to_the_base_install(tmp_path):
    def resolve(target: str) -> dict[str, str]:
        report = tmp_path / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
            + ["--quiet", "--report", str(report), "-e", target],
            cwd=REPO,
            check=True,
        )
        items = json.loads(report.read_text())["install"]
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}

    base, ui = resolve("."), resolve(".[ui]")
    assert base == ui  # same packages at the same versions: nothing to install, nothing moves
    assert base["dagster"] == base["dagster-webserver"]


def test_every_code_folder_with_an_init_is_a_listed_package():
    """A sub-package missing from ``[tool.setuptools] packages`` would be left out of the wheel."""
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    folders = {
        "unclip." + ".".join(init.parent.relative_to(REPO).parts)
        for top in CODE
        for init in (REPO / top).rglob("__init__.py")
    }
    assert {"unclip.training.models", "unclip.training.engine"} <= folders
    assert folders <= listed, f"not packaged: {sorted(folders - listed)}"
