"""``docs/python-api.md`` runs: its ```python blocks are executed in order, in one namespace,
against tiny untrained exports; blocks fenced ```python not-executed are only compiled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_exports import build_tiny_store

import unclip

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
NOT_EXECUTED = "not-executed"


def code_blocks(text: str) -> list[tuple[int, bool, str]]:
    """(line number, executed?, source) of each ```python block, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        info = m.group(1).split()
        if info and info != [NOT_EXECUTED]:
            raise ValueError(f"{DOC}:{line}: unknown fence info {m.group(1)!r}")
        blocks.append((line, not info, m.group(2)))
    return blocks


def run_blocks(blocks: list[tuple[int, bool, str]]) -> dict:
    """Execute the executed blocks in one namespace; compile the others. Errors name the line."""
    namespace: dict = {"__name__": "python_api_doc"}
    for line, executed, source in blocks:
        code = compile(source, f"{DOC.name}:{line}", "exec")
        if executed:
            try:
                exec(code, namespace)
            except Exception as e:
                raise AssertionError(f"the block at {DOC.name}:{line} failed: {e!r}") from e
    return namespace


@pytest.fixture
def demo_folder(tmp_path, monkeypatch):
    """A working folder whose ``configs/demo.yaml`` names a store of tiny untrained exports."""
    (tmp_path / "configs").mkdir()
    build_tiny_store(tmp_path, tmp_path / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_code_block_of_the_python_api_doc_runs(demo_folder):
    blocks = code_blocks(DOC.read_text())
    assert sum(executed for _, executed, _ in blocks) >= 5
    namespace = run_blocks(blocks)
    assert (demo_folder / "export" / "model_index.json").is_file()
    assert (demo_folder / "copy" / "unclip_pipeline.py").is_file()
    assert (demo_folder / "red-circle.png").is_file()
    assert namespace["images"].shape[0] == 3


def test_the_doc_names_every_public_name():
    text = DOC.read_text()
    for name in unclip.__all__:
        assert f"unclip.{name}" in text, name


def test_a_failing_block_fails_naming_its_line(tmp_path):
    blocks = code_blocks("text\n```python\nx = 1\n```\n\n```python\nassert x == 2\n```\n")
    with pytest.raises(AssertionError, match=r"python-api.md:6 failed"):
        run_blocks(blocks)
    with pytest.raises(ValueError, match="unknown fence info"):
        code_blocks("```python skip\nx = 1\n```\n")
    shown = code_blocks("```python not-executed\nraise SystemExit\n```\n")
    assert run_blocks(shown)["__name__"] == "python_api_doc"
