"""The wind-tunnel notebook runs end to end on the stored example result, from any working
directory, and writes its plots only where it is told (or into a new temporary folder)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "wind_tunnel.ipynb")
PLOTS = ["notebook_el_vs_activation.png", "notebook_loss_vs_compute.png"]


def _tree(root: str) -> dict[str, float]:
    return {
        os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("out_from", ["env", "default"])
def test_wind_tunnel_notebook_executes_from_anywhere(out_from, tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"  # Not the repository root.
    cwd.mkdir()
    out = tmp_path / "out"
    if out_from == "env":
        monkeypatch.setenv("WIND_TUNNEL_OUT", str(out))
    else:  # The default is a new folder under the temporary directory.
        monkeypatch.delenv("WIND_TUNNEL_OUT", raising=False)
        out.mkdir()
        monkeypatch.setenv("TMPDIR", str(out))
    monkeypatch.delenv("WIND_TUNNEL_ROOT", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    before = _tree(NOTEBOOKS)
    with open(NOTEBOOK, encoding="utf-8") as f:
        notebook = nbformat.read(f, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "predicted" in text and "measured EL" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    written = sorted(os.path.relpath(p, out) for p in _tree(str(out)))
    if out_from == "env":
        assert written == PLOTS
    else:
        (folder,) = os.listdir(out)
        assert folder.startswith("wind_tunnel_notebook_")
        assert written == [os.path.join(folder, p) for p in PLOTS]
    assert _tree(NOTEBOOKS) == before and os.listdir(cwd) == []
