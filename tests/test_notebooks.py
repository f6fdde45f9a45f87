"""Both notebooks execute top to bottom (nbclient, the venv's python3 kernel) with tiny settings,
and are stored without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBSEG_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PROBSEG_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("PROBSEG_CKPT", raising=False)
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert time.perf_counter() - start < 180, "a notebook must run in under 3 minutes on 2 CPU cores"
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    images = sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
    assert "| oracle |" in text, "the evaluation table with its oracle row is printed"
    assert images >= 3
    assert list((tmp_path / "runs").rglob("*.png"))
