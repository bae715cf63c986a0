"""notebooks/03_call_endpoint.ipynb, executed top to bottom by a Jupyter kernel against
the running app."""

from __future__ import annotations

from tests.notebooks.test_notebooks import execute, text_outputs


def test_03_call_endpoint(served, tmp_path):
    env = {"GRAINFLOW_URL": served["url"], "GRAINFLOW_API_KEY": served["env"]["analyze_key"]}
    notebook = execute("03_call_endpoint.ipynb", tmp_path, env, timeout_s=300)
    text = text_outputs(notebook)
    assert "answered by: production serve-tiny/1" in text
    assert "from tiff metadata" in text
    assert "masked pixels:" in text and "masked pixels: 0" not in text
    assert "401" in text and "modality" in text
    shown = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert shown, "the overlay figure is displayed in the notebook"
