"""Loss curves of several runs (`training/summaries.py`, `scripts/plot_losses.py`): event files
written by the training loop's own writer for two fake runs, one of them resumed twice with
steps logged again (each start keeps its own file, also within one second); the parsed series,
the later value winning, smoothing, the table, the PNG and the errors.

TensorFlow (the event-file reader) runs only in subprocesses (see tests/conftest.py).
"""

import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest

import processes
from twinbrain_jax import cli
from twinbrain_jax.training import loop
from twinbrain_jax.training import summaries

REPO = pathlib.Path(__file__).resolve().parents[1]
HANG_S = 600  # Only catches a hang: TensorFlow imports slowly on a loaded machine.
STEPS = np.arange(10, 101, 10)


def _loss(steps, offset):
  return 1.0 / (1.0 + 0.05 * steps) + offset


def _log(logdir, steps, offset, eval_steps=()):
  """One start of a run: what `loop.train` writes every `log_every` (and `eval_every`) steps."""
  writer = loop._writer(str(logdir))  # pylint: disable=protected-access
  for step in steps:
    writer.add_scalar("train/loss", _loss(step, offset), step)
    writer.add_scalar("train/grad_norm", 2.0 * _loss(step, offset), step)
    if step in eval_steps:
      writer.add_scalar("eval/loss", _loss(step, offset) + 0.1, step)
  writer.flush()
  writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """`full`: one start, validated at steps 50 and 100. `lora`: started three times; the second
  start resumed from step 40 after step 60 was logged (steps 50, 60 logged again with offset 0.2),
  the third from step 80 (steps 90, 100 with offset 0.3). `cut`: full's file cut mid-record.
  `empty`: a workdir whose tensorboard directory has no events."""
  root = tmp_path_factory.mktemp("runs")
  _log(root / "full" / "tensorboard", STEPS, 0.0, eval_steps=(50, 100))
  _log(root / "lora" / "tensorboard", STEPS[:6], 0.1)
  _log(root / "lora" / "tensorboard", STEPS[4:8], 0.2)
  _log(root / "lora" / "tensorboard", STEPS[8:], 0.3)
  (root / "cut").mkdir()
  [full_file] = (root / "full" / "tensorboard").iterdir()
  data = full_file.read_bytes()
  (root / "cut" / full_file.name).write_bytes(data[:-7])
  (root / "empty" / "tensorboard").mkdir(parents=True)
  return root


_READ = textwrap.dedent("""
    import json, sys
    from twinbrain_jax.training import summaries
    root, out = sys.argv[1:]
    read = {}
    for name in ("full", "lora", "cut"):
      read[name] = {tag: [s.steps.tolist(), s.values.tolist()]
                    for tag, s in summaries.read_run(f"{root}/{name}").items()}
    read["lora_files"] = len(summaries.event_files(f"{root}/lora"))
    with open(out, "w") as f:
      json.dump(read, f)
""")


@pytest.fixture(scope="module")
def parsed(runs):
  """What `read_run` returns for each run, read in a subprocess: {run: {tag: Series}}."""
  out = runs / "parsed.json"
  done = processes.run([sys.executable, "-c", _READ, str(runs), str(out)], runs / "read",
                       HANG_S, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  read = json.loads(out.read_text())
  parsed = {name: {tag: summaries.Series(np.array(s), np.array(v)) for tag, (s, v) in tags.items()}
            for name, tags in read.items() if name != "lora_files"}
  parsed["lora_files"] = read["lora_files"]
  parsed["cut_stderr"] = done.stderr
  return parsed


def test_series_are_the_logged_scalars(parsed):
  full = parsed["full"]
  assert sorted(full) == ["eval/loss", "train/grad_norm", "train/loss"]
  np.testing.assert_array_equal(full["train/loss"].steps, STEPS)
  # Stored as float32 (`simple_value`): exactly the float32 of what was logged.
  np.testing.assert_array_equal(full["train/loss"].values, np.float32(_loss(STEPS, 0.0)))
  np.testing.assert_array_equal(full["train/grad_norm"].values,
                                np.float32(2.0 * _loss(STEPS, 0.0)))
  np.testing.assert_array_equal(full["eval/loss"].steps, [50, 100])
  np.testing.assert_array_equal(full["eval/loss"].values, np.float32(_loss(np.array([50, 100]),
                                                                           0.0) + 0.1))


def test_a_resumed_run_keeps_the_value_logged_last(parsed):
  assert parsed["lora_files"] == 3
  lora = parsed["lora"]["train/loss"]
  np.testing.assert_array_equal(lora.steps, STEPS)  # Steps 50-60 once each, though logged twice.
  offsets = np.array([0.1] * 4 + [0.2] * 4 + [0.3] * 2)
  np.testing.assert_array_equal(lora.values, np.float32(_loss(STEPS, offsets)))


def test_a_file_cut_mid_record_keeps_what_precedes_the_cut(parsed):
  cut = parsed["cut"]
  full = parsed["full"]
  assert "partly written record" in parsed["cut_stderr"]
  # The last event (step 100's eval/loss) is lost, everything before it is read.
  np.testing.assert_array_equal(cut["train/loss"].steps, full["train/loss"].steps)
  np.testing.assert_array_equal(cut["train/loss"].values, full["train/loss"].values)
  np.testing.assert_array_equal(cut["eval/loss"].steps, [50])


@pytest.mark.parametrize("window", [0, 1, 3, 4, 20])
def test_smooth_is_a_trailing_moving_average(window):
  values = np.random.default_rng(window).normal(size=17)
  # Reference: each point the plain mean of the last `window` values (fewer at the start).
  reference = np.array([values[max(0, i - max(window, 1) + 1):i + 1].mean()
                        for i in range(values.size)])
  np.testing.assert_allclose(summaries.smooth(values, window), reference, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="smoothing window is -1"):
    summaries.smooth(values, -1)


def test_table_at_fractions_and_at_steps(parsed):
  runs = {"full": parsed["full"], "lora": parsed["lora"]}
  full = parsed["full"]["train/loss"].values
  lora = parsed["lora"]["train/loss"].values
  header, rows = summaries.table(runs, ["train/loss", "eval/loss"], window=3)
  assert header == ["run", "tag", "10 %", "50 %", "100 %", "last step"]

  def mean3(values, i):
    return f"{values[max(0, i - 2):i + 1].mean():.4g}"

  assert rows[0] == ["full", "train/loss", f"{mean3(full, 0)} (step 10)",
                     f"{mean3(full, 4)} (step 50)", f"{mean3(full, 9)} (step 100)", "100"]
  assert rows[1] == ["lora", "train/loss", f"{mean3(lora, 0)} (step 10)",
                     f"{mean3(lora, 4)} (step 50)", f"{mean3(lora, 9)} (step 100)", "100"]
  eval_full = parsed["full"]["eval/loss"].values
  # 10 % of step 100 lies before the first validation; a run without the tag has dashes.
  assert rows[2] == ["full", "eval/loss", "-", f"{eval_full[0]:.4g} (step 50)",
                     f"{eval_full[:2].mean():.4g} (step 100)", "100"]
  assert rows[3] == ["lora", "eval/loss", "-", "-", "-", "-"]

  header, rows = summaries.table(runs, ["train/loss"], window=0, at_steps=[55, 100, 200])
  assert header == ["run", "tag", "step 55", "step 100", "step 200", "last step"]
  assert rows[1] == ["lora", "train/loss", f"{lora[4]:.4g}", f"{lora[9]:.4g}", "-", "100"]
  markdown = cli.markdown_table(header, rows).splitlines()
  assert markdown[0] == "| run | tag | step 55 | step 100 | step 200 | last step |"
  assert markdown[3] == f"| lora | train/loss | {lora[4]:.4g} | {lora[9]:.4g} | - | 100 |"


def test_errors_name_the_directory_and_the_tags(runs, parsed):
  with pytest.raises(FileNotFoundError) as error:
    summaries.event_files(str(runs / "empty"))
  message = str(error.value)
  assert f"{runs / 'empty'} has no TensorBoard event files" in message
  assert "events.out.tfevents.*" in message and str(runs / "empty" / "tensorboard") in message
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    summaries.event_files(str(runs / "absent"))
  with pytest.raises(ValueError) as error:
    summaries.check_tags({"full": parsed["full"], "lora": parsed["lora"]},
                         ["train/loss", "train/los"])
  assert str(error.value) == ("no run has the tag train/los; the runs have: eval/loss, "
                              "train/grad_norm, train/loss.")


def test_parse_runs_labels():
  assert summaries.parse_runs(["a=/x/run1", "/x/run2/", "runs/lr=1e-4"]) == [
      ("a", "/x/run1"), ("run2", "/x/run2/"), ("lr=1e-4", "runs/lr=1e-4")]
  with pytest.raises(ValueError, match=r"labels \['run'\] name more than one run"):
    summaries.parse_runs(["/x/run", "/y/run"])


def test_script_prints_the_table_and_writes_the_png(runs, tmp_path):
  output = tmp_path / "img" / "losses.png"
  script = [sys.executable, "scripts/plot_losses.py",
            f"--runs=full={runs / 'full'},{runs / 'lora' / 'tensorboard'}",
            "--tags=train/loss,eval/loss", "--smooth=3"]
  done = processes.run([*script, f"--output={output}", "--log_scale"], tmp_path / "plot", HANG_S,
                       cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert "note: tensorboard has no eval/loss." in lines  # Labelled by its directory's name.
  assert "| run | tag | 10 % | 50 % | 100 % | last step |" in lines
  assert any(l.startswith("| tensorboard | train/loss | ") and l.endswith(" | 100 |")
             for l in lines)
  assert lines[-1] == f"wrote {output}"
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  bad = processes.run([*script[:3], "--tags=train/los", f"--output={tmp_path / 'bad.png'}"],
                      tmp_path / "bad", HANG_S, cwd=REPO)
  assert bad.returncode != 0
  assert "error: no run has the tag train/los; the runs have: eval/loss" in bad.stderr
  assert "wrote" not in bad.stdout and not (tmp_path / "bad.png").exists()
  empty = processes.run([*script[:2], f"--runs={runs / 'empty'}"], tmp_path / "empty", HANG_S,
                        cwd=REPO)
  assert empty.returncode != 0
  assert f"error: {runs / 'empty'} has no TensorBoard event files" in empty.stderr
