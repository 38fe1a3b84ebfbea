"""The retention experiment (`sim/retention.py`, `scripts/retention.py`): the stage plan, skipping
and resuming, the report; the smoke preset end to end (slow)."""

import json
import os
import pathlib
import shlex
import sys

import pytest

import processes
from twinbrain_jax import cli
from twinbrain_jax.config_lib import preset_from_file
from twinbrain_jax.sim import evaluation
from twinbrain_jax.sim import metaworld as mw
from twinbrain_jax.sim import retention
from twinbrain_jax.sim import vqa_evaluation

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "retention.py"
VLAS = ("twinbrain_vlm", "monolithic_vlm", "monolithic_vlm_cotrain", "twinbrain_scratch",
        "libra_vlm")
STAGES = ("data/demonstrations", "data/vqa", "train/vlm", *(f"train/{v}" for v in VLAS),
          "eval_vqa/vlm", *(f"eval_vqa/{v}" for v in VLAS), *(f"closed_loop/{v}" for v in VLAS))
BRAINS = dict(vlm=("backbone",), twinbrain_vlm=("left", "right"), monolithic_vlm=("right",),
              monolithic_vlm_cotrain=("right",), twinbrain_scratch=("left", "right"),
              libra_vlm=("planner",))


def _config(preset="smoke"):
  return preset_from_file(CONFIG, preset)


def _flag(command, name):
  values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


def test_plan_trains_every_vla_alike():
  config = _config("default")
  paths = retention.Paths("/out")
  stages = retention.plan(config, paths)
  assert tuple(s.name for s in stages) == STAGES
  trains = {s.name.split("/")[1]: s.commands()[0] for s in stages if s.name.startswith("train/")}
  for name in VLAS:
    command = trains[name]
    assert _flag(command, "config.train.num_steps") == str(config.vla_steps) == "3000"
    assert _flag(command, "config.seed") == "0"
    assert _flag(command, "config.data.data_dir") == "/out/data"
    assert _flag(command, "config.init.tokenizer") == "/out/data/tokenizer"
    from_vlm = [a for a in command if a.startswith("--config.init.vlm_checkpoint=")]
    assert from_vlm == ([] if name == "twinbrain_scratch"
                        else ["--config.init.vlm_checkpoint=/out/runs/vlm/checkpoints"])
  assert _flag(trains["vlm"], "config.train.num_steps") == "2000"
  assert _flag(trains["libra_vlm"], "config").startswith("configs/libra.py:")
  assert _flag(trains["monolithic_vlm_cotrain"], "config").endswith(
      ":metaworld_tiny_monolithic_cotrain")
  loops = {s.name.split("/")[1]: s.commands()[0] for s in stages
           if s.name.startswith("closed_loop/")}
  for name, command in loops.items():  # Libra's intent buffer: one environment at a time.
    assert _flag(command, "num_envs") == ("1" if name == "libra_vlm" else "2")
    assert _flag(command, "tasks") == "mt10,reach-place,reach-place-heldout"
    assert (_flag(command, "episodes"), _flag(command, "max_steps")) == ("10", "200")
  vqa_evals = [s.commands()[0] for s in stages if s.name.startswith("eval_vqa/")]
  assert [_flag(c, "run") for c in vqa_evals] == [f"/out/runs/{n}/checkpoints"
                                                   for n in ("vlm", *VLAS)]
  assert {_flag(c, "split") for c in vqa_evals} == {"heldout"}


class FakeStages:
  """Executes stage commands by writing what the real scripts would (tiny, made-up numbers), and
  records which ran; `fail` names a stage whose command fails, `stop_at` a training step at
  which every training run stops (as a signal would stop it)."""

  def __init__(self, config, root, monkeypatch):
    self.config, self.paths, self.executed = config, retention.Paths(str(root)), []
    self.fail, self.stop_at, self.steps = None, None, {}
    monkeypatch.setattr(retention, "trained_step",
                        lambda directory: self.steps.get(directory, 0))

  def outcomes(self, name, key):
    """Deterministic, different per (name, key): k successes of n."""
    n = 4 + len(key) % 3
    return [i < (len(name) + len(key)) % (n + 1) for i in range(n)]

  def __call__(self, stage, command):
    self.executed.append(stage)
    if stage == self.fail:
      raise retention.StageError(f"{stage} failed (exit status 1): {shlex.join(command)}")
    kind, name = stage.split("/")
    if stage == "data/demonstrations":
      os.makedirs(self.paths.demos)
      tasks = mw.resolve_tasks(self.config.demos.tasks)
      with open(os.path.join(self.paths.demos, "metaworld_generation.json"), "w") as f:
        json.dump(dict(tasks=[dict(task=t, attempted=1, kept=1) for t in tasks]), f)
      os.makedirs(self.paths.tokenizer)
      pathlib.Path(self.paths.tokenizer, "tokenizer.json").write_text("{}")
    elif stage == "data/vqa":
      os.makedirs(self.paths.vqa)
      v = self.config.vqa
      with open(os.path.join(self.paths.vqa, retention.VQA_REPORT), "w") as f:
        json.dump(dict(tasks=list(mw.resolve_tasks(v.tasks)), frames_per_seed=v.frames_per_seed,
                       seeds=dict(train=[0, v.train_seeds - 1],
                                  heldout=[1_000_000, 1_000_000 + v.heldout_seeds - 1]),
                       examples=dict(train=7, heldout=11)), f)
    elif kind == "train":
      steps = int(_flag(command, "config.train.num_steps"))
      self.steps[os.path.join(_flag(command, "workdir"), "checkpoints")] = (
          steps if self.stop_at is None else min(steps, self.stop_at))
    elif kind == "eval_vqa":
      brains = {b: dict(head="tied embeddings", method={"task": "greedy", "left_right":
                                                         "likelihood"},
                        per_type=dict(task=vqa_evaluation.accuracy(self.outcomes(name, b + "t")),
                                      left_right=vqa_evaluation.accuracy(
                                          self.outcomes(name, b + "lr")),
                                      all=vqa_evaluation.accuracy(
                                          self.outcomes(name, b + "t")
                                          + self.outcomes(name, b + "lr"))))
                for b in BRAINS[name]}
      self._write(_flag(command, "output_dir"), name, dict(label=name, brains=brains), "_vqa.png")
    elif kind == "closed_loop":
      groups = {g: dict(evaluation.summarize(self.outcomes(name, g)), tasks=[])
                for g in ("mt10", "reach-place", "reach-place-heldout", "all")}
      settings = dict(episodes_per_task=int(_flag(command, "episodes")),
                      max_steps=int(_flag(command, "max_steps")),
                      num_envs=int(_flag(command, "num_envs")))
      self._write(_flag(command, "output_dir"), name, dict(policy=name, tasks={}, groups=groups,
                                                           settings=settings), "_success.png")

  @staticmethod
  def _write(directory, label, result, png_suffix):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{label}.json"), "w") as f:
      json.dump(result, f)
    pathlib.Path(directory, f"{label}{png_suffix}").write_bytes(b"png")


def _mtimes(root):
  return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(root).rglob("*") if p.is_file()}


def test_a_failed_stage_stops_the_run_and_a_rerun_resumes_then_skips_everything(
    tmp_path, monkeypatch):
  config = _config()
  fake = FakeStages(config, tmp_path, monkeypatch)
  fake.fail = "train/monolithic_vlm"
  with pytest.raises(retention.StageError, match="train/monolithic_vlm failed"):
    retention.run(config, str(tmp_path), execute=fake)
  assert tuple(fake.executed) == STAGES[:STAGES.index("train/monolithic_vlm") + 1]
  timings = json.loads((tmp_path / "stages.json").read_text())
  assert list(timings) == list(STAGES[:STAGES.index("train/monolithic_vlm")])  # Kept.
  assert not (tmp_path / "retention.json").exists()

  fake.fail, fake.executed = None, []
  report = retention.run(config, str(tmp_path), execute=fake)
  assert tuple(fake.executed) == STAGES[STAGES.index("train/monolithic_vlm"):]
  assert set(report["stages"]) == set(STAGES)
  assert all(t["runs"] == 1 and t["wall_s"] >= 0 for t in report["stages"].values())
  # Every number comes from the evaluations' files.
  for name in ("vlm", *VLAS):
    assert set(report["vqa"][name]) == set(BRAINS[name])
    for brain in BRAINS[name]:
      expected = fake.outcomes(name, brain + "t") + fake.outcomes(name, brain + "lr")
      got = report["vqa"][name][brain]["per_type"]["all"]
      assert (got["correct"], got["n"]) == (sum(expected), len(expected))
  for name in VLAS:
    for group in ("mt10", "reach-place", "reach-place-heldout"):
      outcomes = fake.outcomes(name, group)
      got = report["closed_loop"][name][group]
      assert (got["successes"], got["episodes"]) == (sum(outcomes), len(outcomes))
      assert got["ci95"] == pytest.approx(evaluation.wilson_interval(sum(outcomes),
                                                                     len(outcomes)))
    assert report["closed_loop"][name]["num_envs"] == (1 if name == "libra_vlm" else 2)
  assert report["closed_loop_settings"] == dict(tasks="mt10,reach-place,reach-place-heldout",
                                                episodes_per_task=1, max_steps=8)
  markdown = (tmp_path / "retention.md").read_text()
  k, n = sum(fake.outcomes("libra_vlm", "mt10")), len(fake.outcomes("libra_vlm", "mt10"))
  assert f"| libra_vlm | {k}/{n}, {100 * k / n:.1f} %" in markdown
  assert "| twinbrain_scratch | left |" in markdown and "| vlm | backbone |" in markdown
  assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "retention.json").read_text()) == report

  before = _mtimes(tmp_path)
  fake.executed = []
  assert retention.run(config, str(tmp_path), execute=fake) == report
  assert fake.executed == []
  assert _mtimes(tmp_path) == before  # Nothing rewritten, the report included.

  os.remove(tmp_path / "eval" / "closed_loop" / "libra_vlm.json")  # Only that is redone.
  retention.run(config, str(tmp_path), execute=fake)
  assert fake.executed == ["closed_loop/libra_vlm"]
  timings = json.loads((tmp_path / "stages.json").read_text())
  assert timings["closed_loop/libra_vlm"]["runs"] == 2


def test_a_training_run_stopped_early_fails_its_stage_and_resumes(tmp_path, monkeypatch):
  config = _config()
  fake = FakeStages(config, tmp_path, monkeypatch)
  fake.stop_at = 1  # train.py exits 0 after a signal, with a checkpoint at step 1 of 2.
  with pytest.raises(retention.StageError, match=r"train/vlm stopped at step 1 of 2"):
    retention.run(config, str(tmp_path), execute=fake)
  assert fake.executed[-1] == "train/vlm"
  fake.stop_at, fake.executed = None, []
  retention.run(config, str(tmp_path), execute=fake)
  assert fake.executed[0] == "train/vlm"


def test_another_config_or_other_data_is_refused(tmp_path, monkeypatch):
  config = _config()
  fake = FakeStages(config, tmp_path, monkeypatch)
  retention.run(config, str(tmp_path), execute=fake)
  other = _config()
  other.vla_steps = 3
  with pytest.raises(ValueError, match=r"vla_steps: 2 there, 3 now.*another --output_dir"):
    retention.run(other, str(tmp_path), execute=fake)
  faster = _config()
  faster.closed_loop.num_envs = 1  # Changes the speed only: resuming with it is fine.
  fake.executed = []
  retention.run(faster, str(tmp_path), execute=fake)
  assert fake.executed == []
  # Demonstrations that another experiment left in a fresh output dir are never replaced.
  fresh = tmp_path / "fresh"
  os.makedirs(retention.Paths(str(fresh)).demos)
  with open(os.path.join(retention.Paths(str(fresh)).demos, "metaworld_generation.json"),
            "w") as f:
    json.dump(dict(tasks=[dict(task="reach-v3", attempted=1, kept=1)]), f)
  with pytest.raises(FileExistsError, match="holds demonstrations of"):
    retention.run(config, str(fresh), execute=fake)


def test_unknown_vla_is_refused():
  config = _config()
  config.vlas = ("twinbrain_vlm", "twinbrain_lora")
  with pytest.raises(ValueError, match=r"\['twinbrain_lora'\]; known: "):
    retention.plan(config, retention.Paths("/out"))


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
  out = tmp_path / "retention"
  command = [str(REPO / "scripts" / "retention.py"), "--config=configs/retention.py:smoke",
             f"--output_dir={out}"]
  # One CPU device, as the command runs outside the tests (not the suite's 8 fake devices).
  env = dict(os.environ, XLA_FLAGS=cli.with_host_device_count(os.environ.get("XLA_FLAGS", ""), 1))
  first = processes.run([sys.executable, *command], tmp_path / "first", cwd=REPO, env=env)
  assert first.returncode == 0, first.stderr[-5000:] + first.stdout[-5000:]
  report = json.loads((out / "retention.json").read_text())
  assert set(report["stages"]) == set(STAGES)
  for name in ("vlm", *VLAS):
    assert set(report["vqa"][name]) == set(BRAINS[name])
    for brain in report["vqa"][name].values():
      a = brain["per_type"]["all"]
      assert 0 < a["n"] and 0 <= a["correct"] <= a["n"]
      assert a["ci95"] == pytest.approx(evaluation.wilson_interval(a["correct"], a["n"]))
  for name in VLAS:  # One episode per task: 10 MT10 tasks, 4 places of each family.
    r = report["closed_loop"][name]
    assert [r[g]["episodes"] for g in ("mt10", "reach-place", "reach-place-heldout")] == [10, 4, 4]
  markdown = (out / "retention.md").read_text()
  assert all(f"| {name} |" in markdown for name in VLAS)

  before = _mtimes(out)
  second = processes.run([sys.executable, *command], tmp_path / "second", cwd=REPO, env=env)
  assert second.returncode == 0, second.stderr[-5000:]
  assert second.stdout.count("output exists: skipped") == len(STAGES)
  assert "no stage ran: skipped" in second.stdout
  assert "$ " not in second.stdout  # No command ran.
  assert _mtimes(out) == before
