"""The notebooks in docs/notebooks/ execute without error (nbclient), and are stored without outputs.

The kernel notebook runs its kernels on a GPU when there is one, else in the SIMT emulator it
enters itself; the benchmark notebook times the real (not emulated) ops, so it runs with
``BNBCY_EMULATE_CUDA`` unset.
"""
import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["bench_vs_bitsandbytes.ipynb", "kernel_work.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.delenv("BNBCY_EMULATE_CUDA", raising=False)
    # the kernel inherits the environment: make it import this checkout's bnbcy
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()                      # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if path.stem == "kernel_work":
        assert "source restored" in text and "kernels in modules" in text
    else:
        assert "bnb/bnbcy" in text
        assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
