"""Benchmarks one policy inference, in process and over the websocket server.

  python scripts/bench_policy.py --presets=tiny,small --repeats=20

Per preset: a float32 bundle of the preset with random weights (exported by the project's own
`export_bundle`, synthetic tokenizer and bridge statistics), one 480x640 camera frame, a 7-dim
state and a 12-word instruction, batch 1. In process, the inference is split into preprocess
(validation, resize/pad, tokenisation, normalisation), brains (both VLMs and the expert's
cross-attention K/V), DiT steps (the ODE loop) and postprocess (un-normalisation), each timed
after the device finished; `Policy.infer` end to end is timed apart. Over the socket,
`scripts/serve.py` runs in a subprocess and the real openpi client measures the round trip.
Medians of `--repeats` runs after a warm-up; compile times are reported apart. Then throughput:
1, 4 and 8 openpi clients (threads of this process) sending requests of a 224x224 frame (as
openpi's example clients send) back to back, against a server that runs one request
at a time (`--max_batch=1`) and one that batches the requests of several clients
(`--max_batch=8`): requests per second, round-trip percentiles, and the server's queue / model
split.
"""

import contextlib
import functools
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.data.normalization import ArrayStats
from twinbrain_jax.models import twinbrain
from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer
from twinbrain_jax.serving.policy import Policy
from twinbrain_jax.training import checkpoint as checkpoint_lib
from twinbrain_jax.training import export
from twinbrain_jax.training.demo_data import CORPUS

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import twinbrain as twinbrain_configs  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "Presets of configs/twinbrain.py.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per measurement (median reported).")
_REQUESTS = flags.DEFINE_integer("requests_per_client", 20,
                                 "Throughput: requests each client sends, back to back.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Throughput: rounds, alternating between the "
                               "servers (medians reported).")
_HANG_S = 600

INSTRUCTION = "put the small spoon from the basket on the towel next to the blue cloth"


def _median_ms(fn, repeats):
  fn()  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def write_bundle(preset: str, directory: pathlib.Path) -> pathlib.Path:
  """A float32 bundle of `preset` with random weights and synthetic bridge statistics."""
  config = twinbrain_configs.get_config(preset)
  config.data.datasets, config.data.weights = ("bridge_dataset",), (1.0,)
  model_config = twinbrain.TwinBrainConfig.from_config_dict(config.model)
  model = twinbrain.TwinBrainVLA(model_config)
  obs, grid = twinbrain.synthetic_observation(model_config, (4,))
  expert = model_config.action_expert
  noisy = jnp.zeros((1, expert.action_horizon, expert.action_dim))
  params = nn.unbox(jax.jit(lambda r: model.init(r, obs, grid, noisy, jnp.zeros(1)))(
      jax.random.key(0))["params"])
  rng = np.random.default_rng(0)
  stats = lambda: ArrayStats.compute(rng.normal(size=(1000, 7))).to_json()
  norm_stats = {"bridge_dataset": dict(action=stats(), state=stats())}
  write_synthetic_tokenizer(directory / "tokenizer", model_config.backbone, CORPUS,
                            (model_config.action_token_id, model_config.propri_token_id))
  return export.export_bundle(params, checkpoint_lib.config_to_json(config), norm_stats,
                              directory / "tokenizer", directory / "bundle", dtype="float32")


def observation(seed: int = 0, image_shape: tuple[int, int] = (480, 640)) -> dict:
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (*image_shape, 3), dtype=np.uint8),
              state=rng.normal(size=7).astype(np.float32), instruction=INSTRUCTION)


def bench_in_process(bundle_dir: pathlib.Path, repeats: int) -> dict:
  policy = Policy.load(bundle_dir)
  obs = observation()
  compile_policy_s = policy.warmup()[1]
  checked = [policy.check(obs)]
  batch = policy.model_batch(checked)
  model, params = policy.bundle.model, policy.bundle.params
  grid = policy.inputs.image_grid_thw(1)

  start = time.perf_counter()
  brains = jax.jit(functools.partial(twinbrain.observation_context, model,
                                     image_grid_thw=grid)).lower(params, batch).compile()
  compile_brains_s = time.perf_counter() - start
  context_kv, context_mask = brains(params, batch)
  noise = jax.random.normal(jax.random.key(0), twinbrain.action_chunk_shape(model.config, 1))
  start = time.perf_counter()
  dit = jax.jit(functools.partial(twinbrain.denoise, model, num_steps=policy.num_steps,
                                  method=policy.method)).lower(
      params, batch, context_kv, context_mask, noise).compile()
  compile_dit_s = time.perf_counter() - start
  normalized = np.asarray(dit(params, batch, context_kv, context_mask, noise))

  times = dict(
      preprocess=_median_ms(lambda: policy.model_batch([policy.check(obs)]), repeats),
      brains=_median_ms(lambda: jax.block_until_ready(brains(params, batch)), repeats),
      dit=_median_ms(lambda: jax.block_until_ready(
          dit(params, batch, context_kv, context_mask, noise)), repeats),
      postprocess=_median_ms(lambda: policy.postprocess(normalized, checked), repeats),
      infer=_median_ms(lambda: policy.infer(obs), repeats))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return dict(times, params_m=num_params / 1e6, num_steps=policy.num_steps,
              compile_policy_s=compile_policy_s, compile_brains_s=compile_brains_s,
              compile_dit_s=compile_dit_s)


@contextlib.contextmanager
def serving(bundle_dir: pathlib.Path, log_dir: pathlib.Path, *flags: str):
  """`scripts/serve.py` in a subprocess on a free loopback port; yields the port. SIGTERM (and,
  if it hangs, SIGKILL) on exit."""
  log = log_dir / f"serve{'_'.join(flags).replace('-', '').replace('=', '')}.out"
  stdout = open(log, "w")
  server = subprocess.Popen(
      [sys.executable, str(REPO / "scripts/serve.py"), f"--bundle={bundle_dir}",
       "--host=127.0.0.1", "--port=0", *flags], stdout=stdout, stderr=subprocess.DEVNULL,
      start_new_session=True)
  try:
    deadline = time.monotonic() + _HANG_S
    while not (match := re.search(r"serving on ws://127\.0\.0\.1:(\d+)", log.read_text())):
      if server.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"serve.py did not start: {log.read_text()}")
      time.sleep(0.5)
    yield int(match.group(1))
  finally:
    server.send_signal(signal.SIGTERM)
    try:
      server.wait(timeout=_HANG_S)
    except subprocess.TimeoutExpired:
      os.killpg(server.pid, signal.SIGKILL)
      server.wait()
    stdout.close()


def bench_socket(bundle_dir: pathlib.Path, repeats: int, log_dir: pathlib.Path) -> dict:
  from openpi_client.websocket_client_policy import WebsocketClientPolicy  # Test extra.

  with serving(bundle_dir, log_dir) as port:
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    obs = observation()
    timings = []

    def request():
      timings.append(client.infer(obs)["server_timing"])

    round_trip = _median_ms(request, repeats)
    client._ws.close()
  server_ms = {k: float(np.median([t[k] for t in timings[1:]]))
               for k in ("preprocess_ms", "model_ms", "postprocess_ms", "queue_ms")}
  return dict(round_trip=round_trip, **server_ms)


def bench_clients(port: int, num_clients: int, requests_per_client: int) -> dict:
  """`num_clients` openpi clients, each sending `requests_per_client` requests back to back
  (after one untimed request each); requests per second, round-trip percentiles and the
  server's queue / model split."""
  from openpi_client.websocket_client_policy import WebsocketClientPolicy  # Test extra.

  clients = [WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in range(num_clients)]
  # 224x224 frames, as openpi's example clients send them (resized on the robot's computer).
  observations = [observation(seed=c, image_shape=(224, 224)) for c in range(num_clients)]
  for client, obs in zip(clients, observations):
    client.infer(obs)
  start = threading.Barrier(num_clients + 1)
  round_trips, timings, errors = [], [], []

  def run(client, obs):
    try:
      start.wait()
      for _ in range(requests_per_client):
        sent = time.perf_counter()
        timing = client.infer(obs)["server_timing"]
        round_trips.append(time.perf_counter() - sent)
        timings.append(timing)
    except Exception as e:  # pylint: disable=broad-except  (reported below)
      errors.append(e)

  threads = [threading.Thread(target=run, args=pair) for pair in zip(clients, observations)]
  for t in threads:
    t.start()
  start.wait()
  began = time.perf_counter()
  for t in threads:
    t.join()
  wall = time.perf_counter() - began
  for client in clients:
    client._ws.close()
  if errors:
    raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
  p50, p90, p99 = 1e3 * np.percentile(round_trips, [50, 90, 99])
  median = lambda key: float(np.median([t[key] for t in timings]))
  return dict(requests_per_s=len(round_trips) / wall, p50=p50, p90=p90, p99=p99,
              queue_ms=median("queue_ms"), model_ms=median("model_ms"),
              batch_size=float(np.mean([t["batch_size"] for t in timings])))


def bench_throughput(bundle_dir: pathlib.Path, requests_per_client: int, rounds: int,
                     log_dir: pathlib.Path) -> list[dict]:
  """1, 4 and 8 clients against a server that batches across clients and one that does not.
  Both servers run side by side (the idle one waits on its socket) and are measured in turn,
  `rounds` times, so that both see the same background load; medians over the rounds."""
  rows = []
  with serving(bundle_dir, log_dir, "--max_batch=1") as one, \
       serving(bundle_dir, log_dir, "--max_batch=8") as batched:
    for num_clients in (1, 4, 8):
      runs = {1: [], 8: []}
      for _ in range(rounds):
        for max_batch, port in ((1, one), (8, batched)):
          runs[max_batch].append(bench_clients(port, num_clients, requests_per_client))
      for max_batch, results in runs.items():
        rows.append(dict(max_batch=max_batch, clients=num_clients,
                         **{k: float(np.median([r[k] for r in results])) for k in results[0]}))
  return sorted(rows, key=lambda r: (r["max_batch"], r["clients"]))


def main(argv):
  del argv
  rows = []
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    for preset in _PRESETS.value:
      directory = pathlib.Path(tmp, preset)
      directory.mkdir()
      bundle = write_bundle(preset, directory)
      rows.append(dict(preset=preset, **bench_in_process(bundle, _REPEATS.value),
                       socket=bench_socket(bundle, _REPEATS.value, directory),
                       clients=bench_throughput(bundle, _REQUESTS.value, _ROUNDS.value,
                                                directory)))
  print(f"\nPolicy inference on {jax.devices()[0].platform} ({os.cpu_count()} cores), fp32, "
        "batch 1 (one 480x640 frame, 7-dim state, 12-word instruction), median of "
        f"{_REPEATS.value} runs after a warm-up; 1-minute load average {load_before:.2f} before "
        f"/ {os.getloadavg()[0]:.2f} after (above the core count, other processes shared the "
        "CPU)\n")
  print("| preset | params (M) | preprocess (ms) | brains (ms) | DiT steps (ms) | postprocess (ms) "
        "| sum (ms) | Policy.infer (ms) | compile: sampler / brains / DiT (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    parts = r["preprocess"] + r["brains"] + r["dit"] + r["postprocess"]
    print(f"| {r['preset']} | {r['params_m']:.1f} | {r['preprocess']:.2f} | {r['brains']:.2f} | "
          f"{r['dit']:.2f} ({r['num_steps']} steps) | {r['postprocess']:.2f} | {parts:.2f} | "
          f"{r['infer']:.2f} | {r['compile_policy_s']:.1f} / {r['compile_brains_s']:.1f} / "
          f"{r['compile_dit_s']:.1f} |")
  print("\nOver the socket (scripts/serve.py in a subprocess, openpi-client on loopback)\n")
  print("| preset | round trip (ms) | server preprocess (ms) | server model (ms) | "
        "server postprocess (ms) | queue (ms) | transport + msgpack (ms) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    s = r["socket"]
    served = s["preprocess_ms"] + s["model_ms"] + s["postprocess_ms"] + s["queue_ms"]
    print(f"| {r['preset']} | {s['round_trip']:.2f} | {s['preprocess_ms']:.2f} | "
          f"{s['model_ms']:.2f} | {s['postprocess_ms']:.2f} | {s['queue_ms']:.2f} | "
          f"{s['round_trip'] - served:.2f} |")


  print(f"\nSeveral clients (scripts/serve.py, openpi-client threads in this process, each "
        f"sending {_REQUESTS.value} requests of a 224x224 frame back to back; max batch 1 = one "
        "request at a time, 8 = requests of several clients batched, window 2 ms; medians of "
        f"{_ROUNDS.value} rounds alternating between the two servers)\n")
  print("| preset | max batch | clients | requests/s | p50 (ms) | p90 (ms) | p99 (ms) | "
        "server queue (ms) | server model (ms) | mean batch |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    for c in r["clients"]:
      print(f"| {r['preset']} | {c['max_batch']} | {c['clients']} | {c['requests_per_s']:.1f} | "
            f"{c['p50']:.1f} | {c['p90']:.1f} | {c['p99']:.1f} | {c['queue_ms']:.1f} | "
            f"{c['model_ms']:.1f} | {c['batch_size']:.2f} |")


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
