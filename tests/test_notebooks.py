"""The notebooks run end to end, and are committed without outputs.

Each notebook runs in a fresh Jupyter kernel (this interpreter) in a temporary folder, with
SWIFTKV_NOTEBOOK_SIZE=tiny: a tiny random model instead of SmolLM2-135M, fewer steps and shorter
prompts, but the same cells. Compiled programs go to the repository's .jax_cache, as the other
tests' do; generated data goes to the temporary folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "swiftkv-jax-tests"
CELL_TIMEOUT_S = 600


def _notebook_libraries():
    try:
        import nbclient
        import nbformat
    except ImportError:
        raise ImportError("running the notebooks needs nbclient and ipykernel; install the test "
                          "extra: .venv/bin/pip install -e '.[test]'") from None
    return nbclient, nbformat


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_swiftkv_distillation.ipynb", "03_performance.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_clean(path):
    """Valid nbformat 4, no outputs or execution counts (strip them before committing), and a
    first code cell that reads the size knob."""
    _, nbformat = _notebook_libraries()
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them "
                       "(e.g. jupyter nbconvert --clear-output --inplace) before committing")
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "SWIFTKV_NOTEBOOK_SIZE" in first.source


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A Jupyter data folder holding a kernelspec that runs this interpreter, so the notebooks use
    this venv whatever kernels the machine has installed."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "swiftkv-jax tests", "language": "python"}))
    return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_tiny(path, tmp_path, kernel_dir, monkeypatch):
    nbclient, nbformat = _notebook_libraries()
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("SWIFTKV_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("SWIFTKV_JAX_CACHE", str(ROOT / ".jax_cache"))
    monkeypatch.setenv("SWIFTKV_JAX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s in tiny mode")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    blank = [cell.source.splitlines()[0] for cell in code if "plt.show()" in cell.source
             and not any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert not blank, f"cells that plot showed no figure (is the matplotlib backend Agg?): {blank}"
