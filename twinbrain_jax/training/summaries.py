"""Scalar curves of training runs from their TensorBoard event files: read, smooth, tabulate, plot.

`loop.train` writes its scalars (`train/loss`, `train/grad_norm`, `train/step_time_s`, ...,
`eval/loss` when validating) with tensorboardX to `<workdir>/<train.tensorboard_dir>`. Each start
of a run opens a new event file, and a run resumed from a checkpoint older than its last logged
step logs those steps again: the value written later wins (events are ordered by their wall time).
The files are TFRecords of `Event` protos, read with TensorFlow (installed for tfds).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

EVENT_FILE_PATTERN = "events.out.tfevents.*"
DEFAULT_TENSORBOARD_DIR = "tensorboard"  # configs/twinbrain.py: train.tensorboard_dir.
DEFAULT_FRACTIONS = (0.1, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Series:
  """One tag of one run: `steps` [N] int64, increasing, each once; `values` [N] float64."""
  steps: np.ndarray
  values: np.ndarray


def parse_runs(specs: Sequence[str]) -> list[tuple[str, str]]:
  """(label, directory) per `label=<dir>` or `<dir>` (labelled by its base name)."""
  runs = []
  for spec in specs:
    label, sep, directory = spec.partition("=")
    # A path that itself contains '=' (e.g. `runs/lr=1e-4`) is a directory, not a label.
    if not sep or os.sep in label or (os.path.isdir(spec) and not os.path.isdir(directory)):
      label, directory = os.path.basename(os.path.normpath(spec)), spec
    if not label or not directory:
      raise ValueError(f"--runs entry {spec!r} is neither <dir> nor <label>=<dir>.")
    runs.append((label, directory))
  labels = [label for label, _ in runs]
  repeated = sorted({l for l in labels if labels.count(l) > 1})
  if repeated:
    raise ValueError(f"--runs labels {repeated} name more than one run; give each its own "
                     "label (<label>=<dir>).")
  return runs


def event_files(workdir: str, tensorboard_dir: str = DEFAULT_TENSORBOARD_DIR) -> list[str]:
  """The event files of a run: those in `<workdir>/<tensorboard_dir>`, else in `workdir` itself
  (a run's TensorBoard directory passed directly)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir} is not a directory; pass a training workdir "
                            "(scripts/train.py --workdir).")
  candidates = [os.path.join(workdir, tensorboard_dir), workdir]
  for directory in candidates:
    files = sorted(glob.glob(os.path.join(directory, EVENT_FILE_PATTERN)))
    if files:
      return files
  raise FileNotFoundError(
      f"{workdir} has no TensorBoard event files: looked for {EVENT_FILE_PATTERN} in "
      f"{' and '.join(candidates)}. Pass a training workdir (scripts/train.py --workdir; "
      f"its train.tensorboard_dir, here '{tensorboard_dir}', holds them) or that directory.")


def read_scalars(files: Sequence[str]) -> dict[str, Series]:
  """Every scalar tag in the event files of one run; a step logged more than once keeps the
  value written last. A file cut short (a run killed while writing) keeps what precedes the cut."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = []  # (wall_time, file index, record index, tag, step, value)
  for index, path in enumerate(files):
    try:
      # What `tf.compat.v1.train.summary_iterator` does, without its deprecation warning.
      for number, record in enumerate(tf.data.TFRecordDataset(path)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
          kind = value.WhichOneof("value")
          if kind == "simple_value":  # What tensorboardX's add_scalar writes.
            scalar = value.simple_value
          elif kind == "tensor" and not value.tensor.tensor_shape.dim:  # tf.summary.scalar.
            scalar = tf.make_ndarray(value.tensor).item()
          else:
            continue
          records.append((event.wall_time, index, number, value.tag, event.step, float(scalar)))
    except tf.errors.DataLossError:
      logging.warning("%s ends in a partly written record; read what precedes it.", path)
  by_tag: dict[str, dict[int, float]] = {}
  for _, _, _, tag, step, scalar in sorted(records):
    by_tag.setdefault(tag, {})[step] = scalar  # Later writes replace earlier ones.
  return {tag: Series(np.array(sorted(points), np.int64),
                      np.array([points[s] for s in sorted(points)], np.float64))
          for tag, points in sorted(by_tag.items())}


def read_run(workdir: str, tensorboard_dir: str = DEFAULT_TENSORBOARD_DIR) -> dict[str, Series]:
  """`read_scalars` of the run in `workdir`."""
  return read_scalars(event_files(workdir, tensorboard_dir))


def check_tags(runs: Mapping[str, Mapping[str, Series]], tags: Sequence[str]) -> None:
  """Raises ValueError for a tag that no run has, naming the tags they have."""
  known = sorted({tag for series in runs.values() for tag in series})
  missing = [tag for tag in tags if not any(tag in series for series in runs.values())]
  if missing:
    raise ValueError(f"no run has the tag{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(missing)}; the runs have: {', '.join(known)}.")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average [N] -> [N]: the mean of the last `window` logged values (fewer at the
  start); `window` 0 or 1 leaves the values as they are."""
  if window < 0:
    raise ValueError(f"the smoothing window is {window}; pass 0 (none) or a positive count.")
  values = np.asarray(values, np.float64)
  if window <= 1 or values.size == 0:
    return values.copy()
  sums = np.cumsum(np.concatenate([[0.0], values]))
  ends = np.arange(1, values.size + 1)
  starts = np.maximum(0, ends - window)
  return (sums[ends] - sums[starts]) / (ends - starts)


def value_at(series: Series, step: int, window: int = 0) -> tuple[int, float] | None:
  """(logged step, smoothed value) at the last logged step at or before `step`; None when `step`
  lies before the first or after the last logged step."""
  if not series.steps.size or step < series.steps[0] or step > series.steps[-1]:
    return None
  i = int(np.searchsorted(series.steps, step, side="right")) - 1
  return int(series.steps[i]), float(smooth(series.values[:i + 1], window)[-1])


def table(runs: Mapping[str, Mapping[str, Series]], tags: Sequence[str], window: int = 0,
          at_steps: Sequence[int] = (), fractions: Sequence[float] = DEFAULT_FRACTIONS
          ) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of each run's (smoothed) value of each tag at `at_steps`, or where given, at
  `fractions` of the run's last logged step of that tag (the cell then names the step), and
  that last step; "-" where a run has no such step or not the tag."""
  if at_steps:
    columns = [f"step {s}" for s in at_steps]
  else:
    columns = [f"{100 * f:g} %" for f in fractions]
  header = ["run", "tag", *columns, "last step"]
  rows = []
  for tag in tags:
    for label, scalars in runs.items():
      series = scalars.get(tag)
      if series is None or not series.steps.size:
        rows.append([label, tag, *["-"] * len(columns), "-"])
        continue
      last = int(series.steps[-1])
      cells = []
      for target in (at_steps or [round(f * last) for f in fractions]):
        found = value_at(series, target, window)
        if found is None:
          cells.append("-")
        else:
          cells.append(f"{found[1]:.4g}" + ("" if at_steps else f" (step {found[0]})"))
      rows.append([label, tag, *cells, str(last)])
  return header, rows


def curves_figure(runs: Mapping[str, Mapping[str, Series]], tags: Sequence[str], window: int = 0,
                  log_scale: bool = False):
  """One panel per tag, side by side, one curve per run: the smoothed values, the raw ones drawn
  faintly behind them when smoothing (a matplotlib Figure)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags) + 0.5, 4.0), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, tag in zip(axes[0], tags):
    for i, (label, scalars) in enumerate(runs.items()):
      series = scalars.get(tag)
      if series is None:
        continue
      color = colors[i % len(colors)]
      if window > 1:
        ax.plot(series.steps, series.values, color=color, alpha=0.25, linewidth=0.8)
      ax.plot(series.steps, smooth(series.values, window), color=color, linewidth=1.5,
              label=label)
    ax.set_xlabel("step")
    ax.set_title(tag + (f" (moving average of {window})" if window > 1 else ""))
    if log_scale:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
