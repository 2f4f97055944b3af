"""The wind-tunnel notebook runs end to end on the stored example result."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "wind_tunnel.ipynb")


def test_wind_tunnel_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("WIND_TUNNEL_OUT", str(tmp_path))  # plots go here, not into the repo
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    with open(NOTEBOOK, encoding="utf-8") as f:
        notebook = nbformat.read(f, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "predicted" in text and "measured EL" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert sorted(os.listdir(tmp_path)) == [
        "notebook_el_vs_activation.png",
        "notebook_loss_vs_compute.png",
    ]
