"""Every notebook runs top to bottom (code cells executed in order in one namespace)."""

import json
import os
import pathlib

import pytest

from fixtures_demo import DEMO_GROUP, TINY_DEMO, tiny_demo  # noqa: F401  (pytest fixture)

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.xdist_group(DEMO_GROUP)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tiny_demo):
  monkeypatch.chdir(path.parent)
  # The quickstart's Meta-World part reads the tiny demo's data and policy (as it reads `make
  # demo`'s by default).
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tiny_demo[0]))
  monkeypatch.setenv("QUICKSTART_TASKS", TINY_DEMO["tasks"])
  monkeypatch.setenv("QUICKSTART_ROLLOUT_STEPS", "12")
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
    # Meta-World: the notebook read a demonstration, predicted a chunk of the policy's shape
    # and rolled the policy out to its limit (or success).
    assert len(namespace["dataset"]) >= 1
    assert namespace["predicted"].shape == (namespace["policy"].action_horizon, 4)
    assert namespace["demonstrated"].shape[1] == 4
    rollout = namespace["rollout"]
    assert rollout.frames.shape == (rollout.steps + 1, 112, 112, 3)
    assert rollout.success or rollout.steps == 12
