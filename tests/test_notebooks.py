"""The notebooks as a reader meets them: run top to bottom by a Jupyter kernel (nbclient, as
`make notebooks` runs them through nbconvert), and committed with the outputs of such a run."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from fixtures_demo import DEMO_GROUP, HANG_S, TINY_DEMO
from twinbrain_jax.sim import demo
from twinbrain_jax.sim import metaworld as mw

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Paths of a machine, which a committed output must not show (the notebooks print paths relative
# to their work dir).
MACHINE_PATH = re.compile(r"(?<![\w.])/(tmp|work|home|root|Users|private|var)/")

# Run after a notebook's last cell, in its kernel: the values the assertions below read back.
PROBES = {
    "quickstart.ipynb": """
import json
print(json.dumps(dict(
    first_loss=losses[0], last_loss=losses[-1], sampled=list(sampled.shape),
    actions=list(actions.shape), demonstrations=len(dataset), predicted=list(predicted.shape),
    action_horizon=policy.action_horizon, demonstrated=list(demonstrated.shape),
    frames=list(rollout.frames.shape), steps=rollout.steps, success=rollout.success,
    cwd=os.getcwd(), jupyter_kernel="ipykernel" in sys.modules)))
""",
    "metaworld_results.ipynb": """
import json
print(json.dumps(dict(
    policies=[r["policy"] for r in results],
    recorded=[dict(e, video=os.path.basename(e["video"])) for e in recorded],
    shown=[dict(e, video=os.path.basename(e["video"]), frames=len(iio.imread(e["video"])))
           for e in shown])))
""",
}


def _text(output) -> str:
  """Everything a reader sees of one output, as text (images excluded)."""
  if output.output_type == "stream":
    return output.text
  if output.output_type == "error":
    return "\n".join([output.ename, output.evalue, *output.traceback])
  return "\n".join(v if isinstance(v, str) else json.dumps(v)
                   for k, v in output.get("data", {}).items() if not k.startswith("image/"))


def _check_outputs(nb, name: str) -> int:
  """Asserts every code cell ran in order with an output, none an error or naming a machine path;
  returns the number of images (figures) among the outputs."""
  cells = [c for c in nb.cells if c.cell_type == "code"]
  assert cells, f"{name} has no code cells"
  counts = [c.execution_count for c in cells]
  assert counts == list(range(1, len(cells) + 1)), (
      f"{name}: execution counts {counts}, not one run top to bottom (run `make notebooks`)")
  images = 0
  for i, cell in enumerate(cells):
    assert cell.outputs, f"{name}: code cell {i} has no output (run `make notebooks`)"
    for output in cell.outputs:
      assert output.output_type != "error", f"{name}: code cell {i} failed:\n{_text(output)}"
      found = MACHINE_PATH.search(_text(output))
      assert not found, f"{name}: code cell {i} shows a machine path: {_text(output)!r}"
      images += any(k.startswith("image/") for k in output.get("data", {}))
  return images


@contextlib.contextmanager
def _kernel(nb, cwd: pathlib.Path):
  """An nbclient client with a started kernel in `cwd`; the kernel is shut down on exit, also
  when a cell failed."""
  client = NotebookClient(nb, timeout=HANG_S, startup_timeout=HANG_S, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}, record_timing=False)
  try:
    with client.setup_kernel():
      yield client
  finally:  # setup_kernel cleans up only once the client started; this covers a failed start.
    if client.km is not None and client.km.has_kernel:
      client.km.shutdown_kernel(now=True)


def _run(path: pathlib.Path) -> tuple[nbformat.NotebookNode, dict]:
  """Runs every cell of `path` in a fresh kernel (in the notebook's directory, as Jupyter does),
  then its probe; returns the executed notebook and the probe's values."""
  nb = nbformat.read(path, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(PROBES[path.name]))
  with _kernel(nb, path.parent) as client:
    for index, cell in enumerate(nb.cells):
      client.execute_cell(cell, index)
  probe = nb.cells.pop()
  (stream,) = [o for o in probe.outputs if o.get("name") == "stdout"]
  return nb, json.loads(stream.text)


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == sorted(PROBES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_holds_its_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  assert _check_outputs(nb, path.name) >= 3, f"{path.name}: its figures are not stored"


def test_check_outputs_catches_missing_and_failed_cells():
  ran = lambda source, count, outputs: nbformat.v4.new_code_cell(
      source, execution_count=count, outputs=outputs)
  printed = nbformat.v4.new_output("stream", name="stdout", text="1\n")
  good = nbformat.v4.new_notebook(cells=[ran("print(1)", 1, [printed])])
  assert _check_outputs(good, "good") == 0
  never_run = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
  with pytest.raises(AssertionError, match="not one run top to bottom"):
    _check_outputs(never_run, "never_run")
  silent = nbformat.v4.new_notebook(cells=[ran("print(1)", 1, [printed]), ran("x = 1", 2, [])])
  with pytest.raises(AssertionError, match="code cell 1 has no output"):
    _check_outputs(silent, "silent")
  error = nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])
  with pytest.raises(AssertionError, match=r"code cell 0 failed:(?s:.*)ValueError"):
    _check_outputs(nbformat.v4.new_notebook(cells=[ran("f()", 1, [error])]), "failed")
  path = nbformat.v4.new_output("stream", name="stdout", text="read /tmp/twinbrain_demo/eval\n")
  with pytest.raises(AssertionError, match="machine path"):
    _check_outputs(nbformat.v4.new_notebook(cells=[ran("print(d)", 1, [path])]), "path")


def test_a_failing_cell_fails_the_run_and_stops_its_kernel(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("import os\nprint(os.getpid())"),
      nbformat.v4.new_code_cell("raise ValueError('cell 1 fails')")])
  with pytest.raises(CellExecutionError, match="cell 1 fails"):
    with _kernel(nb, tmp_path) as client:
      for index, cell in enumerate(nb.cells):
        client.execute_cell(cell, index)
  kernel_pid = int(nb.cells[0].outputs[0].text)
  assert kernel_pid != os.getpid()
  with pytest.raises(ProcessLookupError):  # The kernel process is gone.
    os.kill(kernel_pid, 0)


@pytest.mark.xdist_group(DEMO_GROUP)
def test_quickstart_runs_in_a_kernel(monkeypatch, tiny_demo):
  # The Meta-World part reads the tiny demo's data and policy (as it reads `make demo`'s by
  # default), on one CPU device as `make notebooks` runs it.
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tiny_demo[0]))
  monkeypatch.setenv("QUICKSTART_TASKS", TINY_DEMO["tasks"])
  monkeypatch.setenv("QUICKSTART_ROLLOUT_STEPS", "12")
  monkeypatch.setenv("XLA_FLAGS", "")
  path = NOTEBOOK_DIR / "quickstart.ipynb"
  nb, values = _run(path)
  assert values["jupyter_kernel"] and values["cwd"] == str(NOTEBOOK_DIR)
  assert values["last_loss"] < values["first_loss"]
  assert values["sampled"] == values["actions"]
  # Meta-World: the notebook read a demonstration, predicted a chunk of the policy's shape and
  # rolled the policy out to its limit (or success).
  assert values["demonstrations"] >= 1
  assert values["predicted"] == [values["action_horizon"], 4]
  assert values["demonstrated"][1] == 4
  assert values["frames"] == [values["steps"] + 1, 112, 112, 3]
  assert values["success"] or values["steps"] == 12
  # What a reader sees: every cell's output, no machine path (the tiny demo is under /tmp), and
  # the three figures (demonstrations, chunk, rollout).
  assert _check_outputs(nb, path.name) == 3
  assert "demonstrations in <work dir>/data/metaworld/1.0.0" in "".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.xdist_group(DEMO_GROUP)
def test_metaworld_results_runs_in_a_kernel(monkeypatch, tiny_demo):
  paths = demo.DemoPaths(str(tiny_demo[0]))
  monkeypatch.setenv("METAWORLD_RESULTS", paths.eval)
  path = NOTEBOOK_DIR / "metaworld_results.ipynb"
  nb, values = _run(path)
  assert values["policies"] == ["expert", "random", "twinbrain"]
  # The tiny demo records the trained policy's one episode (as `make demo` records its five per
  # task); its outcome and length are the JSON file's.
  (task,) = mw.resolve_tasks(TINY_DEMO["tasks"])
  with open(os.path.join(paths.eval, "twinbrain.json")) as f:
    result = json.load(f)["tasks"][task]
  episode = dict(policy="twinbrain", task=task, seed=mw.EVAL_SEED_START,
                 video=f"{task}_seed{mw.EVAL_SEED_START}.gif",
                 success=result["success_per_episode"][0], steps=result["steps_per_episode"][0])
  assert values["recorded"] == [episode]
  (shown,) = values["shown"]  # A success or a failure: the one there is.
  assert 2 <= shown.pop("frames") <= episode["steps"] + 1  # A GIF may merge repeated frames.
  assert shown == episode
  # Figures: the success plot, the episode plot and the rollout.
  assert _check_outputs(nb, path.name) == 3
