"""The retention experiment (`configs/retention.py`, `scripts/retention.py`, docs/retention.md):
how much of a pretrained VLM's question answering each VLA keeps, beside its closed-loop success.

Stages, in order; each is skipped when its output exists, so re-running the command resumes:

1. data: scripted-expert demonstrations and the shared tokenizer
   (`scripts/make_metaworld_dataset.py`), the VQA corpus (`scripts/make_vqa_dataset.py`);
2. the VLM (`scripts/train.py`, `configs/vlm.py`);
3. the VLAs (`scripts/train.py`), every one with the same steps, seed and data; a run stopped
   part-way (killed, preempted) resumes from its latest checkpoint;
4. evaluations: `scripts/eval_vqa.py` on every run (each brain, held-out scenes) and
   `scripts/eval_metaworld.py` on every VLA (MT10, reach-place with seen and held-out phrasings);
5. the report: `retention.json` (every number, with each stage's wall time), `retention.md`
   (the tables) and `retention.png`.

Stages run as child processes, the commands a user would type (printed before each), as in
`sim/demo.py`: TensorFlow, which the data writers load, never shares a process with the renderer.
A failing stage stops the run with its name; earlier outputs stay and later stages do not run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from twinbrain_jax.sim import demo
from twinbrain_jax.sim import metaworld as mw

StageError = demo.StageError
VQA_DATASET = os.path.join("metaworld_vqa", "1.0.0")
VQA_REPORT = "metaworld_vqa_generation.json"  # `vqa_dataset.REPORT_FILE` (that module loads TF)
GROUP_TITLES = {"mt10": "MT10", "reach-place": "reach-place (seen phrasings)",
                "reach-place-heldout": "reach-place (held-out phrasings)"}
# Settings that change how fast a stage runs, never what it writes: a resumed run may change them.
SPEED_ONLY = (("closed_loop", "num_envs"), ("demos", "num_workers"))


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where the experiment in `root` writes."""
  root: str

  data = property(lambda self: os.path.join(self.root, "data"))
  tokenizer = property(lambda self: os.path.join(self.data, "tokenizer"))
  vqa = property(lambda self: os.path.join(self.data, VQA_DATASET))
  eval_vqa = property(lambda self: os.path.join(self.root, "eval", "vqa"))
  closed_loop = property(lambda self: os.path.join(self.root, "eval", "closed_loop"))
  config = property(lambda self: os.path.join(self.root, "config.json"))
  stages = property(lambda self: os.path.join(self.root, "stages.json"))
  report = property(lambda self: os.path.join(self.root, "retention.json"))
  markdown = property(lambda self: os.path.join(self.root, "retention.md"))
  figure = property(lambda self: os.path.join(self.root, "retention.png"))

  @property
  def demos(self) -> str:
    return demo.DemoPaths(self.root).dataset  # <root>/data/metaworld/<version>

  def run(self, name: str) -> str:
    return os.path.join(self.root, "runs", name)

  def checkpoints(self, name: str) -> str:
    return os.path.join(self.run(name), "checkpoints")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: `commands()` make its output, `done()` tells whether it is there; `verify()`
  runs after the commands and raises `StageError` if they exited 0 without finishing (a
  training run stopped by a signal saves a checkpoint and exits 0)."""
  name: str
  commands: Callable[[], list[list[str]]]
  done: Callable[[], bool]
  verify: Callable[[], None] = lambda: None


def _files_exist(*paths: str) -> Callable[[], bool]:
  return lambda: all(os.path.exists(p) for p in paths)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` through a temporary file, so a crash never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def run_names(config: ml_collections.ConfigDict) -> list[str]:
  """The runs whose brains answer questions: the VLM, then the VLAs in report order."""
  return ["vlm", *config.vlas]


# Stage 1: data.

def _demos_done(config: ml_collections.ConfigDict, paths: Paths) -> bool:
  """The demonstrations and the tokenizer exist; demonstrations of other tasks or another
  count are an error (nothing here replaces data it did not make for this config)."""
  from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(paths.demos, mwd.REPORT_FILE)):
    return False
  report = mwd.read_report(paths.demos)
  have = [(t["task"], t["attempted"]) for t in report["tasks"]]
  want = [(t, config.demos.episodes_per_task) for t in mw.resolve_tasks(config.demos.tasks)]
  if have != want:
    raise FileExistsError(
        f"{paths.demos} holds demonstrations of {have}, not the {want} (task, episodes) this "
        f"config asks for; remove {paths.data} or choose another output dir.")
  return os.path.exists(os.path.join(paths.tokenizer, "tokenizer.json"))


def _demo_commands(config: ml_collections.ConfigDict, paths: Paths) -> list[list[str]]:
  settings = demo.DemoSettings(tasks=config.demos.tasks,
                               episodes_per_task=config.demos.episodes_per_task,
                               config=config.demos.tokenizer_config)
  commands = demo.dataset_commands(settings, demo.DemoPaths(paths.root))
  if commands and "--tokenizer_only" not in commands[0]:
    commands[0].append(f"--num_workers={config.demos.num_workers}")
  return commands


def _vqa_done(config: ml_collections.ConfigDict, paths: Paths) -> bool:
  report_path = os.path.join(paths.vqa, VQA_REPORT)
  if not os.path.exists(report_path):
    return False
  report = _read_json(report_path)
  v = config.vqa
  have = dict(tasks=report["tasks"], frames_per_seed=report["frames_per_seed"],
              seeds={s: hi - lo + 1 for s, (lo, hi) in report["seeds"].items()})
  want = dict(tasks=list(mw.resolve_tasks(v.tasks)), frames_per_seed=v.frames_per_seed,
              seeds=dict(train=v.train_seeds, heldout=v.heldout_seeds))
  if have != want:
    raise FileExistsError(f"{paths.vqa} holds a VQA corpus of {have}, not the {want} this config "
                          f"asks for; remove it or choose another output dir.")
  return True


def _vqa_commands(config: ml_collections.ConfigDict, paths: Paths) -> list[list[str]]:
  v = config.vqa
  return [demo.script("make_vqa_dataset.py", f"--data_dir={paths.data}", f"--tasks={v.tasks}",
                      f"--train_seeds={v.train_seeds}", f"--heldout_seeds={v.heldout_seeds}",
                      f"--frames_per_seed={v.frames_per_seed}")]


# Stages 2 and 3: training.

def trained_step(checkpoint_dir: str) -> int:
  """The latest whole checkpoint step of a run (0 if none)."""
  from twinbrain_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  return max((s.step for s in checkpoint.list_steps(checkpoint_dir) if s.whole), default=0)


def _train_stage(config: ml_collections.ConfigDict, paths: Paths, name: str, preset: str,
                 steps: int, vlm_checkpoint: str | None) -> Stage:
  flags = [f"--config={preset}", f"--workdir={paths.run(name)}",
           f"--config.data.data_dir={paths.data}", f"--config.init.tokenizer={paths.tokenizer}",
           f"--config.seed={config.seed}", f"--config.train.num_steps={steps}",
           # A progress bar with the loss instead of library INFO logs.
           "--config.train.progress_bar=True", "--verbosity=-1", *config.train_overrides]
  if vlm_checkpoint:
    flags.append(f"--config.init.vlm_checkpoint={vlm_checkpoint}")

  def verify() -> None:
    step = trained_step(paths.checkpoints(name))
    if step < steps:
      raise StageError(f"train/{name} stopped at step {step} of {steps} (a signal?); re-run the "
                       "same command to resume it from there")

  return Stage(f"train/{name}", lambda: [demo.script("train.py", *flags)],
               lambda: trained_step(paths.checkpoints(name)) >= steps, verify)


# Stage 4: evaluations.

def _vqa_eval_stage(config: ml_collections.ConfigDict, paths: Paths, name: str) -> Stage:
  flags = [f"--run={paths.checkpoints(name)}", f"--data_dir={paths.data}",
           f"--split={config.eval_vqa.split}", f"--label={name}",
           f"--output_dir={paths.eval_vqa}", "--verbosity=-1"]
  if config.eval_vqa.limit:
    flags.append(f"--limit={config.eval_vqa.limit}")
  outputs = [os.path.join(paths.eval_vqa, f"{name}{suffix}") for suffix in (".json", "_vqa.png")]
  return Stage(f"eval_vqa/{name}", lambda: [demo.script("eval_vqa.py", *flags)],
               _files_exist(*outputs))


def _closed_loop_stage(config: ml_collections.ConfigDict, paths: Paths, name: str) -> Stage:
  c = config.closed_loop
  # Libra's intent buffer follows one episode at a time (eval_metaworld.py refuses N > 1).
  num_envs = 1 if config.vla_presets[name].one_env else c.num_envs
  flags = [f"--policy={paths.checkpoints(name)}", f"--label={name}", f"--tasks={c.tasks}",
           f"--episodes={c.episodes}", f"--max_steps={c.max_steps}", f"--num_envs={num_envs}",
           "--num_videos=0", f"--output_dir={paths.closed_loop}"]
  outputs = [os.path.join(paths.closed_loop, f"{name}{suffix}")
             for suffix in (".json", "_success.png")]
  return Stage(f"closed_loop/{name}", lambda: [demo.script("eval_metaworld.py", *flags)],
               _files_exist(*outputs))


def plan(config: ml_collections.ConfigDict, paths: Paths) -> list[Stage]:
  """Every stage but the report, in the order they run."""
  unknown = sorted(set(config.vlas) - set(config.vla_presets))
  if unknown:
    raise ValueError(f"config.vlas names {unknown}; known: {', '.join(config.vla_presets)}.")
  stages = [Stage("data/demonstrations", lambda: _demo_commands(config, paths),
                  lambda: _demos_done(config, paths)),
            Stage("data/vqa", lambda: _vqa_commands(config, paths),
                  lambda: _vqa_done(config, paths)),
            _train_stage(config, paths, "vlm", config.vlm.config, config.vlm.steps, None)]
  for name in config.vlas:
    preset = config.vla_presets[name]
    stages.append(_train_stage(config, paths, name, preset.config, config.vla_steps,
                               paths.checkpoints("vlm") if preset.from_vlm else None))
  stages += [_vqa_eval_stage(config, paths, name) for name in run_names(config)]
  stages += [_closed_loop_stage(config, paths, name) for name in config.vlas]
  return stages


# Resuming: the same config, timings kept across runs.

def check_config(config: ml_collections.ConfigDict, paths: Paths) -> None:
  """Stores the config on the first run; raises ValueError if a later run's differs in
  anything but `SPEED_ONLY` settings (its outputs would mix two experiments)."""
  current = json.loads(config.to_json())
  if not os.path.exists(paths.config):
    os.makedirs(paths.root, exist_ok=True)
    _write_json(paths.config, current)
    return
  stored = _read_json(paths.config)
  strip = lambda c: {k: ({kk: vv for kk, vv in v.items() if (k, kk) not in SPEED_ONLY}
                         if isinstance(v, dict) else v) for k, v in c.items()}
  if strip(stored) != strip(current):
    keys = sorted(k for k in set(stored) | set(current)
                  if strip(stored).get(k) != strip(current).get(k))
    diffs = "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in keys)
    raise ValueError(f"{paths.root} holds an experiment with another config ({diffs}); resume "
                     "it with the same preset and overrides, or choose another --output_dir.")


def _record(paths: Paths, timings: dict[str, Any], name: str, seconds: float) -> None:
  entry = timings.setdefault(name, dict(wall_s=0.0, runs=0))
  entry["wall_s"] += seconds
  entry["runs"] += 1
  entry["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  _write_json(paths.stages, timings)


def run(config: ml_collections.ConfigDict, root: str, *,
        execute: Callable[[str, Sequence[str]], None] = demo.check_call) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `root`; returns the report.

  Args:
    execute: runs one command of a stage, raising `StageError` if it fails (tests replace it).

  Raises:
    StageError: a stage failed (named in the message); later stages did not run.
    FileExistsError, ValueError: `root` holds data or a config of another experiment.
  """
  paths = Paths(os.path.abspath(root))
  check_config(config, paths)
  stages = plan(config, paths)
  timings = _read_json(paths.stages) if os.path.exists(paths.stages) else {}
  ran = []
  for i, stage in enumerate(stages, 1):
    print(f"\n=== [{i}/{len(stages) + 1}] {stage.name}", flush=True)
    if stage.done():
      print("output exists: skipped", flush=True)
      continue
    start = time.perf_counter()
    for command in stage.commands():
      execute(stage.name, command)
    stage.verify()
    _record(paths, timings, stage.name, time.perf_counter() - start)
    ran.append(stage.name)
  print(f"\n=== [{len(stages) + 1}/{len(stages) + 1}] report", flush=True)
  if not ran and all(os.path.exists(p) for p in (paths.report, paths.markdown, paths.figure)):
    print("output exists and no stage ran: skipped", flush=True)
    return _read_json(paths.report)
  report = build_report(config, paths, timings)
  write_report(report, paths)
  print(report_markdown(report), flush=True)
  print(f"wrote {paths.report}, {paths.markdown}, {paths.figure}", flush=True)
  return report


# Stage 5: the report.

def build_report(config: ml_collections.ConfigDict, paths: Paths,
                 timings: Mapping[str, Any]) -> dict[str, Any]:
  """Every number of the experiment from the evaluations' JSONs, with the stage timings."""
  vqa = {}
  for name in run_names(config):
    result = _read_json(os.path.join(paths.eval_vqa, f"{name}.json"))
    vqa[name] = {brain: dict(head=r["head"], per_type=r["per_type"], method=r["method"])
                 for brain, r in result["brains"].items()}
  closed_loop, settings = {}, None
  for name in config.vlas:
    result = _read_json(os.path.join(paths.closed_loop, f"{name}.json"))
    settings = settings or result["settings"]
    closed_loop[name] = {group: {k: result["groups"][group][k]
                                 for k in ("successes", "episodes", "success_rate", "ci95")}
                         for group in config.closed_loop.groups}
    closed_loop[name]["num_envs"] = result["settings"]["num_envs"]
  corpus = _read_json(os.path.join(paths.vqa, VQA_REPORT))
  from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=g-import-not-at-top
  demos = mwd.read_report(paths.demos)
  return dict(
      preset=config.get("preset"), config=json.loads(config.to_json()),
      data=dict(demonstrations=sum(t["kept"] for t in demos["tasks"]),
                demonstration_tasks=[t["task"] for t in demos["tasks"]],
                vqa_examples=corpus["examples"], vqa_tasks=corpus["tasks"]),
      vqa=vqa, closed_loop=closed_loop,
      closed_loop_settings=dict(tasks=config.closed_loop.tasks,
                                episodes_per_task=settings["episodes_per_task"],
                                max_steps=settings["max_steps"]),
      stages=dict(timings), wall_s=sum(t["wall_s"] for t in timings.values()))


def _episodes(settings: Mapping[str, Any]) -> str:
  n = settings["episodes_per_task"]
  return f"{n} episode{'' if n == 1 else 's'}"


def _cell(k: int, n: int, ci95: Sequence[float]) -> str:
  return f"{k}/{n}, {100 * k / n if n else 0:.1f} % [{100 * ci95[0]:.1f}, {100 * ci95[1]:.1f}]"


def report_markdown(report: Mapping[str, Any]) -> str:
  """The report's tables: VQA per brain and question type, closed-loop success per VLA, stage
  wall times (95 % Wilson intervals)."""
  types = [t for t in next(iter(next(iter(report["vqa"].values())).values()))["per_type"]
           if t != "all"]
  lines = [f"Held-out VQA, exact match ({sum(report['data']['vqa_examples'].values())} corpus "
           f"examples, {report['data']['vqa_examples'].get('heldout', 0)} held out):", "",
           "| run | brain | all [95 % interval] | " + " | ".join(types) + " |",
           "|---|---|---|" + "---|" * len(types)]
  for name, brains in report["vqa"].items():
    for brain, r in brains.items():
      a = r["per_type"]["all"]
      cells = [f"{r['per_type'][t]['correct']}/{r['per_type'][t]['n']}" if t in r["per_type"]
               else "-" for t in types]
      lines.append(f"| {name} | {brain} | {_cell(a['correct'], a['n'], a['ci95'])} | "
                   + " | ".join(cells) + " |")
  s = report["closed_loop_settings"]
  groups = list(next(iter(report["closed_loop"].values())))
  groups = [g for g in groups if g != "num_envs"]
  lines += ["", f"Closed loop ({_episodes(s)} per task on the evaluation seeds, "
            f"{s['max_steps']}-step limit):", "",
            "| VLA | " + " | ".join(GROUP_TITLES.get(g, g) for g in groups) + " |",
            "|---|" + "---|" * len(groups)]
  for name, r in report["closed_loop"].items():
    lines.append(f"| {name} | " + " | ".join(
        _cell(r[g]["successes"], r[g]["episodes"], r[g]["ci95"]) for g in groups) + " |")
  lines += ["", "| stage | wall time | runs |", "|---|---|---|"]
  for name, t in report["stages"].items():
    lines.append(f"| {name} | {t['wall_s']:.0f} s | {t['runs']} |")
  lines.append(f"| **all** | **{report['wall_s'] / 60:.1f} min** | |")
  return "\n".join(lines)


def report_figure(report: Mapping[str, Any]):
  """Left: every brain's held-out VQA accuracy; right: each VLA's closed-loop success per task
  group; 95 % Wilson intervals (a matplotlib Figure)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                    gridspec_kw=dict(width_ratios=(1, 1.2)))
  labels, rows = [], []
  for name, brains in report["vqa"].items():
    for brain, r in brains.items():
      labels.append(f"{name}\n{brain}")
      rows.append(r["per_type"]["all"])
  _bars(left, np.arange(len(rows)), [rows], 0.7, [None])
  left.set_xticks(np.arange(len(rows)), labels, rotation=45, ha="right", fontsize=8)
  left.set_ylabel("exact-match accuracy (95% Wilson CI)")
  left.set_title("held-out VQA, all question types")
  vlas = list(report["closed_loop"])
  groups = [g for g in next(iter(report["closed_loop"].values())) if g != "num_envs"]
  width = 0.8 / len(groups)
  series = [[dict(report["closed_loop"][v][g], accuracy=report["closed_loop"][v][g]
                  ["success_rate"]) for v in vlas] for g in groups]
  _bars(right, np.arange(len(vlas)), series, width, [GROUP_TITLES.get(g, g) for g in groups])
  right.set_xticks(np.arange(len(vlas)), vlas, rotation=30, ha="right", fontsize=8)
  right.set_ylabel("success rate (95% Wilson CI)")
  s = report["closed_loop_settings"]
  right.set_title(f"closed loop, {_episodes(s)} per task, {s['max_steps']}-step limit")
  right.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _bars(ax, x: np.ndarray, series: Sequence[Sequence[Mapping[str, Any]]], width: float,
          labels: Sequence[str | None]) -> None:
  """Grouped bars: one series per label, each row's `accuracy` with its `ci95` as error bars."""
  for i, (rows, label) in enumerate(zip(series, labels)):
    values = np.array([r["accuracy"] for r in rows])
    lo = np.maximum(0.0, values - np.array([r["ci95"][0] for r in rows]))  # Rounding at 0, 1.
    hi = np.maximum(0.0, np.array([r["ci95"][1] for r in rows]) - values)
    ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=[lo, hi], capsize=2,
           label=label)
  ax.set_ylim(0, 1.05)


def write_report(report: Mapping[str, Any], paths: Paths) -> None:
  """The markdown and the figure, then the JSON (last: its presence means the report is whole)."""
  from twinbrain_jax.sim import evaluation  # pylint: disable=g-import-not-at-top
  with open(paths.markdown, "w") as f:
    f.write(report_markdown(report) + "\n")
  evaluation.save_figure(lambda: report_figure(report), paths.figure)
  _write_json(paths.report, report)
