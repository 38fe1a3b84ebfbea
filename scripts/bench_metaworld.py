"""Meta-World on this machine: scripted-expert success per task and rendering frames/s.

  python scripts/bench_metaworld.py --tasks=mt10 --episodes=10 --sizes=64,112,224

Expert episodes run from the data seeds without rendering (success does not depend on it);
rendering is timed separately, per frame size, on one task after a warm-up frame.
"""

import time
import warnings

import numpy as np
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.sim import metaworld as mw

_TASKS = flags.DEFINE_string("tasks", "mt10", "Tasks and groups (see sim/metaworld.py).")
_EPISODES = flags.DEFINE_integer("episodes", 10, "Expert episodes per task.")
_SIZES = flags.DEFINE_list("sizes", ["64", "112", "224"], "Square frame sizes to time.")
_FRAMES = flags.DEFINE_integer("frames", 200, "Frames timed per size.")


def main(argv):
  del argv
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
  print(f"{'task':<30} {'success':>8} {'mean steps':>10} {'physics steps/s':>15}")
  rates = []
  for task in mw.resolve_tasks(_TASKS.value):
    with mw.make_env(task, 32) as env:
      expert = mw.expert_policy(task)
      start, episodes = time.perf_counter(), []
      for seed in mw.data_seeds(_EPISODES.value):
        episodes.append(mw.rollout(env, lambda ts: expert(ts.raw), seed, render=False))
      seconds = time.perf_counter() - start
    wins = [e for e in episodes if e.success]
    steps = sum(len(e) for e in episodes)
    rates.append(len(wins) / len(episodes))
    mean = f"{np.mean([len(e) for e in wins]):.0f}" if wins else "-"
    print(f"{task:<30} {len(wins):>4}/{len(episodes):<3} {mean:>10} {steps / seconds:>15.0f}",
          flush=True)
  print(f"{'mean':<30} {100 * np.mean(rates):>7.1f}%")
  print(f"\n{'frame':>9} {'render frames/s':>16}")
  for size in (int(s) for s in _SIZES.value):
    with mw.make_env("pick-place-v3", size) as env:
      env.reset(seed=0)  # The first frame creates the GL context.
      start = time.perf_counter()
      for _ in range(_FRAMES.value):
        env.render()
      print(f"{size:>4}x{size:<4} {_FRAMES.value / (time.perf_counter() - start):>16.1f}",
            flush=True)


if __name__ == "__main__":
  cli.run(main)
