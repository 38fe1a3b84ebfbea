"""Every notebook runs top to bottom (code cells executed in order in one namespace)."""

import json
import os
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.chdir(path.parent)
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  assert cells, f"{path.name} has no code cells"
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    try:
      exec(compile(source, f"{path.name}[code cell {i}]", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"{path.name}: code cell {i} failed: {e!r}") from e
  if path.name == "quickstart.ipynb":
    assert namespace["losses"][-1] < namespace["losses"][0]
    assert namespace["sampled"].shape == namespace["actions"].shape
