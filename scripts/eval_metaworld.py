"""Closed-loop Meta-World evaluation: K episodes per task on the held-out evaluation seeds.

  python scripts/eval_metaworld.py --policy=/work/mw_runs/twinbrain/checkpoints --tasks=mt10 \
      --episodes=10 --output_dir=/tmp/mw_eval
  python scripts/eval_metaworld.py --server=127.0.0.1:8000 ...     # scripts/serve.py, openpi-client
  python scripts/eval_metaworld.py --policy=expert ...             # or --policy=random

--policy is a bundle or checkpoint dir (run in this process), `expert` (Meta-World's scripted
policies) or `random`; --server=host:port drives a policy server through openpi-client's
`WebsocketClientPolicy`. Chunks are executed as the policy's `execution` block says (served in its
metadata) unless --replan_steps / --ensemble / --horizon override it. Writes
`<output_dir>/<label>.json`, `<label>_success.png` and GIFs of the first --num_videos episodes of
each task under `<label>_videos/`; prints a table with 95 % Wilson intervals. On MT50 it adds the
mean of the four difficulty groups (the published average, with a bootstrap interval) and
`<label>_groups.png`, the groups beside the rows the SmolVLA paper reports.

--num_envs=N runs N environments at once, each in a worker process, and asks the policy for one
batch per control step (`Policy.infer_batch` in process; N connections to a server, whose
batching serves them together). Every episode keeps its seed and noise seeds, so the outcomes are
the sequential run's. If a worker fails, the run stops naming the task and seed, and the finished
episodes are written to `<label>_incomplete.json`.
"""

import concurrent.futures
import json
import os
import sys
import warnings

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.serving.execution import ENSEMBLE_MODES, ExecutionConfig
from twinbrain_jax.sim import evaluation
from twinbrain_jax.sim import metaworld as mw

_POLICY = flags.DEFINE_string("policy", None, "A bundle or checkpoint dir, `expert` or `random`.")
_SERVER = flags.DEFINE_string("server", None, "Or host:port of scripts/serve.py.")
_STEP = flags.DEFINE_integer("step", None, "With a checkpoint dir: the step; default the latest.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "With a checkpoint dir: default the "
                                 "run's init.tokenizer.")
_TASKS = flags.DEFINE_string("tasks", "mt10", "Tasks and groups (mt10, mt50, easy, reach-v3...).")
_EPISODES = flags.DEFINE_integer("episodes", 10, "Episodes per task.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 0, "First evaluation seed after 1 000 000.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 400, "Episode limit (LeRobot's evaluation: 400; "
                                  "Meta-World allows 500).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Rendered frame size; default the "
                                   "policy's data.image_size (112 for expert/random).")
_REPLAN = flags.DEFINE_integer("replan_steps", None, "Steps between chunk requests; default the "
                               "policy's execution.replan_steps.")
_ENSEMBLE = flags.DEFINE_enum("ensemble", None, ENSEMBLE_MODES, "none (chunk broker), temporal "
                              "(ACT) or adaptive (CogACT); default the policy's.")
_HORIZON = flags.DEFINE_integer("horizon", None, "Steps a chunk is used for; default the "
                                "policy's.")
_INSTRUCTIONS = flags.DEFINE_enum("instructions", "auto", ["auto", "task", "blank"],
                                  "blank sends \"\" (instruction-blind ablation); auto: blank iff "
                                  "the in-process policy's run set data.drop_instruction.")
_LIBRA_MODE = flags.DEFINE_enum("libra_mode", None, ["interleaved", "async"],
                                "A Libra policy's runtime; default its config's runtime.mode.")
_LABEL = flags.DEFINE_string("label", None, "Name in the results; default the policy's.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the JSON, plot and videos go.",
                                  required=True)
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 1, "Episodes recorded per task (every frame).")
_NUM_ENVS = flags.DEFINE_integer("num_envs", 1, "Environments run at once in worker processes; "
                                 "the policy gets one batch of requests per control step.")
_PLOT_WITH = flags.DEFINE_list("plot_with", [], "Earlier result JSONs drawn next to this one.")


# The reported MT50 rows drawn beside a measured one (evaluation.REPORTED_MT50 has them all).
_REPORTED_IN_PLOT = ("Diffusion Policy", "TinyVLA", "π0 (3.5B-PaliGemma)", "SmolVLA (0.45B)")


def _execution(served: dict | None) -> ExecutionConfig:
  """The policy's execution block with the flags' overrides applied."""
  base = ExecutionConfig.from_config_dict(served)
  overrides = dict(replan_steps=_REPLAN.value, ensemble=_ENSEMBLE.value, horizon=_HORIZON.value)
  fields = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
  if overrides["replan_steps"] is not None and overrides["horizon"] is None:
    fields["horizon"] = max(fields["horizon"], fields["replan_steps"])
  return ExecutionConfig(**fields)


def _server_clients(address: str, count: int):
  """`count` openpi-client connections to host:port (one per environment)."""
  from openpi_client.websocket_client_policy import WebsocketClientPolicy  # pylint: disable=g-import-not-at-top
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    sys.exit(f"error: --server={address!r}; give host:port, e.g. 127.0.0.1:8000.")
  return [WebsocketClientPolicy(host=host, port=int(port)) for _ in range(count)]


def _agent():
  """(agent, image size, label, a callable that releases it)."""
  if (_POLICY.value is None) == (_SERVER.value is None):
    sys.exit("error: pass exactly one of --policy (dir, expert, random) and --server=host:port.")
  if _POLICY.value in ("expert", "random"):
    agent = evaluation.ExpertAgent() if _POLICY.value == "expert" else evaluation.RandomAgent()
    return agent, _IMAGE_SIZE.value or mw.DEFAULT_IMAGE_SIZE, lambda: None
  num_envs = _NUM_ENVS.value
  if _SERVER.value is not None:
    clients = _server_clients(_SERVER.value, num_envs)
    metadata = clients[0].get_server_metadata()
    if num_envs > 1 and "libra" in metadata:
      _close_all(clients)
      sys.exit(f"error: the server at {_SERVER.value} serves a Libra policy, whose intent "
               "buffer follows one episode at a time; evaluate it with --num_envs=1.")
    threads = concurrent.futures.ThreadPoolExecutor(num_envs)

    def infer_batch(observations):  # One request per connection, all in flight together.
      replies = threads.map(lambda pair: pair[0].infer(pair[1]), zip(clients, observations))
      return [reply["actions"] for reply in replies]

    drop = _INSTRUCTIONS.value == "blank"
    agent = evaluation.ChunkAgent(clients[0].infer, _execution(metadata.get("execution")),
                                  name=f"server {_SERVER.value}", drop_instruction=drop,
                                  infer_batch=infer_batch)
    size = _IMAGE_SIZE.value or tuple(metadata.get("image_size") or mw.DEFAULT_IMAGE_SIZE)
    return agent, size, lambda: (threads.shutdown(), _close_all(clients))
  from twinbrain_jax.serving.policy import Policy, batch_bucket  # pylint: disable=g-import-not-at-top
  try:
    libra = {} if _LIBRA_MODE.value is None else dict(mode=_LIBRA_MODE.value)
    policy = Policy.load(_POLICY.value, step=_STEP.value, tokenizer_dir=_TOKENIZER.value,
                         max_batch_size=max(8, batch_bucket(num_envs)), **libra)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if num_envs > 1 and "libra" in policy.metadata():
    sys.exit(f"error: {_POLICY.value} is a Libra policy, whose intent buffer follows one episode "
             "at a time; evaluate it with --num_envs=1.")
  data = policy.bundle.config.data
  drop = (bool(data.get("drop_instruction", False)) if _INSTRUCTIONS.value == "auto"
          else _INSTRUCTIONS.value == "blank")
  agent = evaluation.ChunkAgent(policy.infer, _execution(policy.metadata()["execution"]),
                                name=os.path.basename(os.path.normpath(_POLICY.value)),
                                drop_instruction=drop,
                                infer_batch=lambda obs: policy.infer_batch(obs)["actions"])
  return agent, _IMAGE_SIZE.value or tuple(data.image_size), lambda: None


def _close_all(clients) -> None:
  for client in clients:
    client._ws.close()  # pylint: disable=protected-access


def main(argv):
  del argv
  # Meta-World's scripted policies warn about their own gains; the simulator clips actions.
  warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
  import tqdm  # pylint: disable=g-import-not-at-top
  try:
    tasks = mw.resolve_tasks(_TASKS.value)
    mw.eval_seeds(_EPISODES.value, _SEED_OFFSET.value)
    evaluation.check_num_envs(_NUM_ENVS.value, len(tasks), _EPISODES.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  agent, image_size, close = _agent()
  label = _LABEL.value or agent.name
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  stem = os.path.join(_OUTPUT_DIR.value, evaluation.result_stem(label))
  os.makedirs(f"{stem}_videos", exist_ok=True)
  bar = tqdm.tqdm(total=len(tasks) * _EPISODES.value, desc=label, unit="episode")
  successes = [0]

  def on_episode(episode: evaluation.Episode) -> None:
    successes[0] += episode.success
    bar.update(1)
    bar.set_postfix(task=episode.task.removesuffix("-v3"), success=successes[0])
    if episode.frames is not None:
      evaluation.write_video(episode.frames, evaluation.video_path(
          _OUTPUT_DIR.value, label, episode.task, episode.seed))

  try:
    result = evaluation.evaluate(agent, tasks, _EPISODES.value, seed_offset=_SEED_OFFSET.value,
                                 image_size=image_size, max_steps=_MAX_STEPS.value,
                                 num_videos=_NUM_VIDEOS.value, num_envs=_NUM_ENVS.value,
                                 on_episode=on_episode)
  except evaluation.EvaluationStopped as e:
    bar.close()
    with open(f"{stem}_incomplete.json", "w") as f:
      json.dump(dict(e.partial, policy=label), f, indent=1)
    done = sum(r["episodes"] for r in e.partial["tasks"].values())
    sys.exit(f"error: {e}\nThe {done} finished episodes are in {stem}_incomplete.json.")
  finally:
    bar.close()
    close()
  result["policy"] = label
  result["settings"].update(
      source=_POLICY.value or f"server {_SERVER.value}",
      instruction="blank" if getattr(agent, "drop_instruction", False) else "task",
      execution=getattr(agent, "execution", None) and agent.execution.__dict__)
  with open(f"{stem}.json", "w") as f:
    json.dump(result, f, indent=1)
  others = []
  for path in _PLOT_WITH.value:
    with open(path) as f:
      others.append(json.load(f))
  evaluation.plot_success(others + [result], f"{stem}_success.png")
  if "difficulty_average" in result:  # MT50: the published comparison, per difficulty group.
    reported = {k: evaluation.REPORTED_MT50[k] for k in _REPORTED_IN_PLOT}
    evaluation.plot_groups([r for r in others + [result] if "difficulty_average" in r],
                           f"{stem}_groups.png", reported)
  print(evaluation.format_table(result))
  print(f"{result['frames_rendered']} frames rendered in {result['wall_s']:.0f} s; wrote "
        f"{stem}.json, {stem}_success.png, videos in {stem}_videos/", flush=True)


if __name__ == "__main__":
  cli.run(main, info_logs=False)
