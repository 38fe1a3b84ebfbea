"""`make demo`: the Meta-World closed loop (data -> training -> export -> server -> evaluation)."""

import contextlib
import json
import os
import pathlib
import signal
import sys
import time

import pytest

import processes
from fixtures_demo import DEMO_GROUP, TINY_DEMO
from twinbrain_jax.sim import demo
from twinbrain_jax.sim import evaluation
from twinbrain_jax.sim import metaworld as mw
from twinbrain_jax.sim import metaworld_dataset as mwd
from twinbrain_jax.training import export

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_settings_refuse_bad_values():
  with pytest.raises(ValueError, match="drawer-close-v3"):  # Close matches of a misspelt task.
    demo.DemoSettings(tasks="drawer-clse")
  with pytest.raises(ValueError, match="eval_episodes must be >= 1"):
    demo.DemoSettings(eval_episodes=0)
  with pytest.raises(ValueError, match="train_steps must be >= 1"):
    demo.DemoSettings(train_steps=0)


def _fake_dataset(paths, tasks):
  os.makedirs(paths.dataset)
  with open(os.path.join(paths.dataset, mwd.REPORT_FILE), "w") as f:
    json.dump(dict(tasks=[dict(task=t) for t in tasks]), f)


def test_data_is_made_once_and_never_replaced(tmp_path):
  settings = demo.DemoSettings(tasks="drawer-close,window-open")
  paths = demo.DemoPaths(str(tmp_path))
  (command,) = demo.dataset_commands(settings, paths)
  assert "--tasks=drawer-close,window-open" in command and f"--data_dir={paths.data}" in command
  _fake_dataset(paths, ["drawer-close-v3", "window-open-v3"])
  (command,) = demo.dataset_commands(settings, paths)  # Only the tokenizer is missing.
  assert "--tokenizer_only" in command
  os.makedirs(paths.tokenizer)
  assert demo.dataset_commands(settings, paths) == []
  with pytest.raises(FileExistsError, match="holds demonstrations of drawer-close-v3, "
                     "window-open-v3, not of the requested reach"):
    demo.dataset_commands(demo.DemoSettings(tasks="reach"), paths)


def test_lerobot_demo_writes_and_trains_from_a_lerobot_dataset(tmp_path):
  settings = demo.DemoSettings(tasks="reach", data_format="lerobot")
  paths = demo.DemoPaths(str(tmp_path), settings.data_format)
  assert paths.dataset == os.path.join(paths.data, mwd.LEROBOT_DIR)
  (command,) = demo.dataset_commands(settings, paths)
  assert "--format=lerobot" in command
  train = demo.train_command(settings, paths)
  assert f"--config.data.datasets=({mwd.lerobot_entry()!r},)" in train
  with pytest.raises(ValueError, match="data_format='parquet'; choose rlds or lerobot"):
    demo.DemoSettings(data_format="parquet")


@pytest.mark.slow
def test_lerobot_demo_commands_train(tmp_path):
  """The demo's own data and training commands, on a LeRobot copy of two demonstrations."""
  settings = demo.DemoSettings(tasks="reach", episodes_per_task=2, data_format="lerobot",
                               config="configs/twinbrain.py:metaworld_tiny", train_steps=2)
  paths = demo.DemoPaths(str(tmp_path), settings.data_format)
  for command in demo.dataset_commands(settings, paths):
    demo.check_call("making the dataset", command)
  assert mwd.read_report(paths.dataset)["tasks"][0]["task"] == "reach-v3"
  demo.check_call("training", demo.train_command(settings, paths))
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_a_failed_stage_stops_the_demo_and_is_named():
  with pytest.raises(demo.StageError, match=r"training failed \(exit status 3\)"):
    demo.check_call("training", [sys.executable, "-c", "import sys; sys.exit(3)"])


_STAGE = """
import os, pathlib, signal, sys, time
pid_file = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (pid_file.with_suffix('.term').touch(), os._exit(0)))
pid_file.write_text(str(os.getpid()))
time.sleep(3600)
"""


def test_a_stage_is_stopped_when_the_process_that_started_it_is_killed(tmp_path):
  """SIGKILL of the orchestrator (nothing of it runs after) still sends the stage SIGTERM."""
  pid_file = tmp_path / "stage.pid"
  orchestrator = ("import sys; from twinbrain_jax.sim import demo; "
                  "demo.check_call('stage', [sys.executable, '-c', sys.argv[1], sys.argv[2]])")
  stage_pid = None
  try:
    with processes.started([sys.executable, "-c", orchestrator, _STAGE, str(pid_file)],
                           log_dir=tmp_path / "log", cwd=REPO) as parent:
      parent.wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the stage's start")
      stage_pid = int(pid_file.read_text())
      os.kill(parent.proc.pid, signal.SIGKILL)
      assert parent.wait() == -signal.SIGKILL
    deadline = time.monotonic() + processes.HANG_TIMEOUT_S  # Only catches a hang.
    while not pid_file.with_suffix(".term").exists():
      assert time.monotonic() < deadline, "the orphaned stage was never sent SIGTERM"
      time.sleep(0.2)
  finally:
    if stage_pid is not None:
      with contextlib.suppress(ProcessLookupError):
        os.kill(stage_pid, signal.SIGKILL)


def test_a_server_that_exits_before_listening_is_an_error():
  server = demo._Server([sys.executable, "-c", "print('no port free')"])
  try:
    with pytest.raises(demo.StageError, match=r"exited \(0\) before it listened"):
      server.wait_ready()
  finally:
    server.stop()


def test_comparison_table_has_a_column_per_policy():
  results = [dict(policy=name, tasks={"reach-v3": evaluation.summarize([True] * k + [False])},
                  groups={"all": evaluation.summarize([True] * k + [False])})
             for name, k in (("expert", 3), ("random", 0))]
  lines = evaluation.format_comparison(results).splitlines()
  assert lines[0].split() == ["task", "expert", "random"]
  assert lines[1].split()[:3] == ["reach-v3", "3/4", "[30%,"] and "0/1" in lines[1]
  assert lines[2].startswith("[all]")


@pytest.mark.xdist_group(DEMO_GROUP)
def test_tiny_demo_runs_the_closed_loop(tiny_demo):
  workdir, result = tiny_demo
  paths = demo.DemoPaths(str(workdir))
  out = result.stdout
  for stage in ("1/4 data", "2/4 training", "3/4 export", "4/4 closed loop"):
    assert stage in out
  assert "serving on ws://127.0.0.1:" in out  # Through the real server ...
  assert "--server=127.0.0.1:" in out  # ... and openpi-client.
  header = [line for line in out.splitlines() if line.startswith("task ")][-1]  # The last table.
  assert header.split() == ["task", "expert", "random", "twinbrain"]
  results = {}
  for label in ("expert", "random", "twinbrain"):
    with open(os.path.join(paths.eval, f"{label}.json")) as f:
      results[label] = json.load(f)
    task = results[label]["tasks"]["drawer-close-v3"]
    assert task["seeds"] == [mw.EVAL_SEED_START] and task["max_steps"] == TINY_DEMO["max_steps"]
    assert task["successes"] == 1 or task["steps_per_episode"] == [TINY_DEMO["max_steps"]]
  assert results["twinbrain"]["settings"]["source"].startswith("server 127.0.0.1:")
  assert os.path.getsize(os.path.join(paths.eval, "twinbrain_success.png")) > 0
  assert os.listdir(os.path.join(paths.eval, "twinbrain_videos"))
  for name in (export.PARAMS_DIR, export.CONFIG_FILE, export.NORM_STATS_FILE, export.TOKENIZER_DIR):
    assert os.path.exists(os.path.join(paths.bundle, name))
  assert f"plot:   {paths.eval}" in out
