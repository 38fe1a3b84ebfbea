"""Meta-World on this machine: scripted-expert success per task and rendering frames/s, or the
speed of parallel evaluation against the number of environments.

  python scripts/bench_metaworld.py --tasks=mt10 --episodes=10 --sizes=64,112,224
  python scripts/bench_metaworld.py --policy=<bundle or checkpoint dir> --num_envs=1,2,4,8 \
      --tasks=mt10 --episodes=2 --max_steps=400

Expert episodes run from the data seeds without rendering (success does not depend on it);
rendering is timed separately, per frame size, on one task after a warm-up frame. With --policy,
the same evaluation (`sim.evaluation.evaluate`, the policy in this process, its samplers compiled
beforehand) runs once per --num_envs value and the table gives episodes per minute.
"""

import os
import time
import warnings

import numpy as np
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.serving.execution import ExecutionConfig
from twinbrain_jax.sim import metaworld as mw

_TASKS = flags.DEFINE_string("tasks", "mt10", "Tasks and groups (see sim/metaworld.py).")
_EPISODES = flags.DEFINE_integer("episodes", 10, "Expert episodes per task.")
_SIZES = flags.DEFINE_list("sizes", ["64", "112", "224"], "Square frame sizes to time.")
_FRAMES = flags.DEFINE_integer("frames", 200, "Frames timed per size.")
_POLICY = flags.DEFINE_string("policy", None, "Time evaluation of this bundle or checkpoint dir.")
_NUM_ENVS = flags.DEFINE_list("num_envs", ["1", "2", "4", "8"], "With --policy: environment "
                              "counts to time.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 400, "With --policy: the episode limit.")


def bench_evaluation() -> None:
  """Episodes per minute of one evaluation per --num_envs value (same episodes each time)."""
  from twinbrain_jax.serving.policy import Policy, batch_bucket  # pylint: disable=g-import-not-at-top
  from twinbrain_jax.sim import evaluation  # pylint: disable=g-import-not-at-top
  counts = [int(n) for n in _NUM_ENVS.value]
  policy = Policy.load(_POLICY.value, max_batch_size=max(8, batch_bucket(max(counts))))
  policy.warmup(sorted({batch_bucket(n) for n in range(1, max(counts) + 1)}))
  agent = evaluation.ChunkAgent(policy.infer, ExecutionConfig.from_config_dict(
      policy.metadata()["execution"]), infer_batch=lambda obs: policy.infer_batch(obs)["actions"])
  tasks = mw.resolve_tasks(_TASKS.value)
  print(f"{len(tasks)} tasks x {_EPISODES.value} episodes, limit {_MAX_STEPS.value} steps, "
        f"frames {policy.metadata()['image_size']}")
  print(f"{'num_envs':>8} {'episodes':>8} {'successes':>9} {'steps':>7} {'frames':>7} "
        f"{'wall s':>7} {'episodes/min':>12} {'load before':>11}")
  for n in counts:
    load = os.getloadavg()[0]
    result = evaluation.evaluate(agent, tasks, _EPISODES.value, max_steps=_MAX_STEPS.value,
                                 image_size=tuple(policy.metadata()["image_size"]), num_envs=n)
    episodes = result["groups"]["all"]["episodes"]
    steps = sum(sum(r["steps_per_episode"]) for r in result["tasks"].values())
    print(f"{n:>8} {episodes:>8} {result['groups']['all']['successes']:>9} {steps:>7} "
          f"{result['frames_rendered']:>7} {result['wall_s']:>7.0f} "
          f"{60 * episodes / result['wall_s']:>12.1f} {load:>11.1f}", flush=True)


def main(argv):
  del argv
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
  if _POLICY.value:
    bench_evaluation()
    return
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
