"""The notebooks run top to bottom on the CPU, and the committed copies carry their outputs (plots included).

Each notebook is executed with nbclient in a kernel that runs *this* interpreter (a kernelspec written to a
temporary JUPYTER_PATH, so a user-level "python3" kernelspec pointing elsewhere cannot be picked up), from the
``notebooks/`` folder like a user would, on a copy: the committed file is not rewritten.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "memopt-tests"


def _images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def _errors(notebook) -> list[str]:
    return [f"{output.ename}: {output.evalue}" for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "memopt tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_there_are_notebooks() -> None:
    assert [path.name for path in NOTEBOOKS] == ["01_where_the_memory_goes.ipynb", "02_feedforward_shards.ipynb",
                                                 "03_pipeline_one_liner.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_has_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), f"{path.name} was not executed"
    assert not _errors(notebook), _errors(notebook)
    assert _images(notebook) >= 1, f"{path.name} has no plot in its committed outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path: Path, kernel_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    assert not _errors(notebook)
    assert _images(notebook) >= 1, f"{path.name} produced no plot"
