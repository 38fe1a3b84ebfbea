"""scripts/serve.py as a subprocess on loopback, driven by the real openpi-client package."""

import contextlib
import json
import re
import signal
import socket
import struct
import sys
import threading
import urllib.request

import numpy as np
import psutil
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed

import processes
from fixtures_data import oxe_data_dir  # noqa: F401  (pytest fixture)
from fixtures_serving import (REPO, aloha_policy_dirs, bad_observation,  # noqa: F401
                              observation, openpi_example, tiny_policy_dirs)
from twinbrain_jax.serving.policy import Policy
from twinbrain_jax.training import export

# openpi-client 0.1.2 connects without a context manager, which websockets 17 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

HANG_S = 300  # Only catches a hang: a loaded 2-core machine compiles slowly.
MAX_MESSAGE_MB = 1  # Small, so that "too large" requests are cheap to send.


@contextlib.contextmanager
def _serving(log_dir, *flags, script="scripts/serve.py"):
  """Runs scripts/serve.py on a free loopback port until the block exits; yields (child, port)."""
  args = [sys.executable, script, "--host=127.0.0.1", "--port=0",
          f"--max_message_mb={MAX_MESSAGE_MB}", *flags]
  with processes.started(args, log_dir, cwd=REPO) as child:
    child.wait_for(lambda: "serving on ws://" in child.stdout, "the server listening", HANG_S)
    port = int(re.search(r"serving on ws://127\.0\.0\.1:(\d+)", child.stdout).group(1))
    yield child, port


def _metric(port, name):
  """A counter of the server's `GET /status`."""
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=HANG_S) as response:
    return json.loads(response.read())[name]


@pytest.fixture(scope="module")
def server(tiny_policy_dirs, tmp_path_factory):
  with _serving(tmp_path_factory.mktemp("server"), f"--bundle={tiny_policy_dirs.bundle_dir}") as (
      child, port):
    yield child, port


@pytest.fixture(scope="module")
def policy(tiny_policy_dirs):
  """The in-process reference."""
  return Policy.load(tiny_policy_dirs.bundle_dir)


@contextlib.contextmanager
def _client(port):
  client = WebsocketClientPolicy(host="127.0.0.1", port=port)
  try:
    yield client
  finally:
    client._ws.close()


@contextlib.contextmanager
def _raw(port):
  """A plain websocket connection, for what the openpi client cannot send; metadata read."""
  with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None,
                                      max_size=None, open_timeout=HANG_S,
                                      close_timeout=1) as connection:
    msgpack_numpy.unpackb(connection.recv(timeout=HANG_S))
    yield connection


def test_health_metadata_and_actions_equal_the_in_process_policy(server, policy):
  child, port = server
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=HANG_S) as response:
    assert response.status == 200 and response.read() == b"OK\n"
  obs = observation(seed=11, dataset="fractal20220817_data", image_shape=(256, 320))
  with _client(port) as client:
    assert client.get_server_metadata() == dict(policy.metadata(),
                                                max_message_bytes=MAX_MESSAGE_MB << 20,
                                                obs_format="twinbrain", max_batch=8,
                                                batch_window_ms=2.0)
    first = client.infer(obs)
    second = client.infer(dict(obs, seed=99))
  np.testing.assert_allclose(first["actions"], policy.infer(obs)["actions"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(second["actions"], policy.infer(dict(obs, seed=99))["actions"],
                             rtol=0, atol=1e-6)
  assert np.abs(first["actions"] - second["actions"]).max() > 1e-3
  timing = second["server_timing"]
  for key in ("preprocess_ms", "model_ms", "postprocess_ms", "queue_ms", "prev_total_ms"):
    assert timing[key] >= 0, key
  assert timing["model_ms"] > 0 and "prev_total_ms" not in first["server_timing"]
  # The user reads the address; library INFO lines (orbax's per-load lines) stay hidden.
  assert not re.search(r"^I\d{4} ", child.stderr, re.M), child.stderr[:2000]


def test_concurrent_clients_get_their_own_answers(server, policy):
  _, port = server
  datasets = ("bridge_dataset", "fractal20220817_data")
  requests = {c: [observation(seed=10 * c + j, dataset=datasets[j % 2],
                              image_shape=(64 + 32 * c, 96), instruction=f"task {c} {j}")
                  for j in range(4)] for c in range(3)}
  expected = {c: [policy.infer(o)["actions"] for o in obs] for c, obs in requests.items()}
  start, got, errors = threading.Barrier(3), {}, []

  def run(c):
    try:
      with _client(port) as client:
        start.wait(timeout=HANG_S)
        got[c] = [client.infer(o)["actions"] for o in requests[c]]
    except BaseException as e:  # pytest's failures are BaseExceptions; reported below.
      errors.append(e)

  threads = [threading.Thread(target=run, args=(c,)) for c in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=HANG_S)
  assert not errors, errors
  for c in range(3):
    for j in range(4):
      np.testing.assert_allclose(got[c][j], expected[c][j], rtol=0, atol=1e-6)
  # Every request has its own answer, so a mix-up would show.
  flat = [a for c in range(3) for a in expected[c]]
  assert min(np.abs(a - b).max() for i, a in enumerate(flat) for b in flat[i + 1:]) > 1e-4


BAD_REQUESTS = [
    (bad_observation(instruction=None), "no 'instruction'"),
    (bad_observation(image=np.zeros((64, 64, 4), np.uint8)), r"'image'.*shape \(64, 64, 4\)"),
    (bad_observation(image=np.zeros((64, 64, 3), np.float32)), "'image'.*dtype float32"),
    (bad_observation(state=np.zeros(8, np.float32)), r"'state'.*shape \(8,\).*expects \[7\]"),
    (bad_observation(instruction=7), "'instruction'.*is a int; send the task as a str"),
    (bad_observation(dataset="kuka"), "'kuka' is unknown"),
    (bad_observation(image=np.zeros((800, 800, 3), np.uint8)),
     r"1920\d+ bytes, more than.*limit of 1048576"),
    (bad_observation(image=np.zeros((0, 64, 64, 3), np.uint8)),
     r"'image'\] holds no camera \(shape \(0, 64, 64, 3\)\)"),
    (bad_observation(state=[[0.1, 0.2], [0.3]]), "'state'.* ragged nested list"),
]


def test_bad_requests_get_named_errors_and_the_server_keeps_serving(server, policy):
  child, port = server
  good = observation(seed=5)
  with _client(port) as client:
    local_port = client._ws.local_address[1]
    for obs, message in BAD_REQUESTS:
      with pytest.raises(RuntimeError, match="Error in inference server:\nBad request: .*"
                         + message):
        client.infer(obs)
    # The same connection goes on working.
    np.testing.assert_allclose(client.infer(good)["actions"], policy.infer(good)["actions"],
                               atol=1e-6)
  with _raw(port) as raw:
    for message, error in ((b"\xc1garbage", "not msgpack"), ("some text", "text frame"),
                           (msgpack_numpy.packb([1, 2]), "holds a list")):
      raw.send(message)
      reply = raw.recv(timeout=HANG_S)
      assert isinstance(reply, str) and error in reply
    raw.send(msgpack_numpy.packb(good))
    np.testing.assert_allclose(msgpack_numpy.unpackb(raw.recv(timeout=HANG_S))["actions"],
                               policy.infer(good)["actions"], atol=1e-6)
  # The log names the client with each problem.
  child.wait_for(lambda: "'kuka' is unknown" in child.stderr, "the log line")
  assert re.search(rf"client 127\.0\.0\.1:{local_port}: bad request: .*'kuka' is unknown",
                   child.stderr)


def test_a_message_over_the_hard_limit_closes_only_its_connection(server, policy):
  _, port = server
  with _raw(port) as raw:
    with pytest.raises((ConnectionClosed, OSError)) as closed:
      raw.send(b"\x00" * (5 * MAX_MESSAGE_MB << 20))  # Over 4 x the limit: never read.
      raw.recv(timeout=HANG_S)
    # The server's close frame says why, unless the TCP reset it sends after (it leaves the
    # rest of the message unread) overtook it.
    if isinstance(closed.value, ConnectionClosed) and closed.value.rcvd is not None:
      assert closed.value.rcvd.code == 1009  # "message too big"
  good = observation(seed=6)
  with _client(port) as client:
    np.testing.assert_allclose(client.infer(good)["actions"], policy.infer(good)["actions"],
                               atol=1e-6)


def test_stalled_and_vanished_clients_do_not_stall_others(server, policy):
  _, port = server
  with contextlib.ExitStack() as stack:
    # Connects over TCP and never says anything.
    mute = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=HANG_S))
    # Starts a 100 kB binary frame and stops after 10 bytes of it.
    stalled = stack.enter_context(_raw(port))
    stalled.socket.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 100_000) + b"\0" * 4
                           + b"x" * 10)
    stack.callback(stalled.socket.shutdown, socket.SHUT_RDWR)  # Its close frame would be payload.
    # Sends a request and vanishes before the reply.
    with _raw(port) as vanished:
      vanished.send(msgpack_numpy.packb(observation(seed=1)))
      vanished.socket.shutdown(socket.SHUT_RDWR)
    good = [observation(seed=s) for s in (7, 8)]
    with _client(port) as client:
      for obs in good:
        np.testing.assert_allclose(client.infer(obs)["actions"], policy.infer(obs)["actions"],
                                   atol=1e-6)
    assert mute.fileno() >= 0


def _soak(port, policy, num_clients, requests_per_client, seed):
  """`num_clients` openpi clients send a mix of valid and malformed requests concurrently.
  Every valid reply must equal the in-process policy's; every bad one must be an error.

  Returns:
    the number of (valid, malformed) requests answered.
  """
  valid = [observation(seed=100 + i, dataset=("bridge_dataset", "fractal20220817_data")[i % 2],
                       image_shape=(120 + 40 * i, 160)) for i in range(4)]
  expected = [policy.infer(o)["actions"] for o in valid]
  counts, errors = np.zeros((num_clients, 2), int), []

  def run(c):
    rng = np.random.default_rng(seed + c)
    try:
      with _client(port) as client:
        for _ in range(requests_per_client):
          kind = rng.integers(4)
          if kind < 2:  # Half valid.
            i = int(rng.integers(len(valid)))
            np.testing.assert_allclose(client.infer(valid[i])["actions"], expected[i], atol=1e-6)
            counts[c, 0] += 1
            continue
          if kind == 2:
            obs, message = BAD_REQUESTS[int(rng.integers(len(BAD_REQUESTS)))]
            with pytest.raises(RuntimeError, match=message):
              client.infer(obs)
          else:  # Garbage bytes through the client's own connection.
            client._ws.send(rng.bytes(int(rng.integers(1, 5000))))
            reply = client._ws.recv(timeout=HANG_S)
            assert isinstance(reply, str) and "Bad request" in reply, reply
          counts[c, 1] += 1
    except BaseException as e:  # pytest's failures are BaseExceptions; reported below.
      errors.append(e)

  threads = [threading.Thread(target=run, args=(c,)) for c in range(num_clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=HANG_S * 10)
  assert not errors, errors[:3]
  return tuple(counts.sum(axis=0))


def _soak_with_memory(server, policy, record_property, requests_per_client, warmup_per_client,
                      fixed_mib, mib_per_request):
  """The soak after a warm-up; the server's RSS may grow by `fixed_mib` (the allocator settling:
  batches of every size draw on new pools, ~+26 MiB over the first 4,800 requests, then flat)
  plus `mib_per_request`."""
  child, port = server
  process = psutil.Process(child.proc.pid)
  _soak(port, policy, 8, warmup_per_client, seed=0)  # Allocator pools, first connections.
  before = process.memory_info().rss
  valid, malformed = _soak(port, policy, 8, requests_per_client, seed=1000)
  after = process.memory_info().rss
  growth_mib = (after - before) / 2**20
  valid, malformed = int(valid), int(malformed)  # pytest-xdist cannot send numpy scalars.
  record_property("soak", dict(requests=valid + malformed, valid=valid, malformed=malformed,
                               clients=8, rss_before_mib=before / 2**20,
                               rss_after_mib=after / 2**20))
  print(f"\nsoak: {valid + malformed} requests ({valid} valid, {malformed} malformed) from 8 "
        f"clients; server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
        f"({growth_mib:+.1f} MiB)")
  assert valid > 0 and malformed > 0
  assert growth_mib < fixed_mib + mib_per_request * (valid + malformed), growth_mib
  good = observation(seed=9)
  with _client(port) as client:
    np.testing.assert_allclose(client.infer(good)["actions"], policy.infer(good)["actions"],
                               atol=1e-6)


def test_short_soak_of_valid_and_malformed_requests(server, policy, record_property):
  # Only a gross leak shows in 200 requests next to the allocator settling.
  _soak_with_memory(server, policy, record_property, requests_per_client=25,
                    warmup_per_client=10, fixed_mib=96, mib_per_request=0.01)


@pytest.mark.slow
def test_long_soak_keeps_memory_flat(server, policy, record_property):
  # Keeping a request's arrays (>= 40 kB each) would add >= 160 MiB over 4,000 requests.
  _soak_with_memory(server, policy, record_property, requests_per_client=500,
                    warmup_per_client=100, fixed_mib=32, mib_per_request=0.005)


def test_sigterm_delivers_the_reply_in_flight_then_exits_0(tiny_policy_dirs, tmp_path, policy):
  # A batch that waits for every connected client: with a second, idle client connected, the
  # first client's request sits in the server until the SIGTERM makes the batch run.
  with _serving(tmp_path, f"--checkpoint={tiny_policy_dirs.checkpoint_dir}", "--max_batch=2",
                "--batch_window_ms=3600000") as (child, port):
    obs = observation(seed=12)
    with _client(port) as client, _raw(port) as idle:
      reply = {}
      sender = threading.Thread(target=lambda: reply.update(client.infer(obs)))
      sender.start()
      child.wait_for(lambda: _metric(port, "pending") == 1, "the request in flight")
      child.proc.send_signal(signal.SIGTERM)
      sender.join(timeout=HANG_S)
      assert not sender.is_alive()
      np.testing.assert_allclose(reply["actions"], policy.infer(obs)["actions"], atol=1e-5)
      assert child.wait(HANG_S) == 0, child.stderr[-3000:]
      with pytest.raises(ConnectionClosed) as closed:
        idle.recv(timeout=HANG_S)
      assert closed.value.rcvd.code == 1001  # Going away.
    assert "stopped" in child.stdout


# --- openpi's own clients ------------------------------------------------------------------------

def _policy_view(name, obs):
  """What the policy itself is given for an openpi observation: the base camera, the state laid
  out as openpi's input transforms lay it out, the prompt."""
  if name == "libero":
    image, state = obs["observation/image"], obs["observation/state"]
  elif name == "droid":
    image = obs["observation/exterior_image_1_left"]
    state = np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]])
  else:
    image, state = obs["images"]["cam_high"].transpose(1, 2, 0), obs["state"]
  return dict(image=image, state=state.astype(np.float32), instruction=obs["prompt"])


@pytest.mark.parametrize("name", ["libero", "droid", "aloha"])
def test_openpi_example_clients_get_the_policys_actions(name, tiny_policy_dirs, aloha_policy_dirs,
                                                        tmp_path):
  if name == "aloha":  # 14 joints: the tests' bimanual embodiment.
    bundle, flags = aloha_policy_dirs.bundle_dir, ["--max_batch=1"]
    script = "tests/serve_test_embodiment.py"
  else:  # LIBERO and DROID send 8 state numbers: the fractal embodiment of the tiny policy.
    bundle, script = tiny_policy_dirs.bundle_dir, "scripts/serve.py"
    flags = ["--max_batch=1", "--dataset=fractal20220817_data"]
  if name == "droid":  # The layout recorded in the bundle: served without --obs_format.
    bundle = export.export_checkpoint(tiny_policy_dirs.checkpoint_dir, tmp_path / "droid_bundle",
                                      "float32", obs_format="droid")
  else:
    flags.append(f"--obs_format={name}")
  reference = Policy.load(bundle, default_dataset=None if name == "aloha" else
                          "fractal20220817_data")
  requests = [openpi_example(name, seed) for seed in range(3)]
  expected = [reference.infer(_policy_view(name, o))["actions"] for o in requests]
  with _serving(tmp_path, f"--bundle={bundle}", *flags, script=script) as (_, port):
    with _client(port) as client:
      metadata = client.get_server_metadata()
      assert metadata["obs_format"] == name
      assert set(openpi_example(name)) <= {k.split("[")[0] for k in metadata["observation_keys"]}
      for obs, actions in zip(requests, expected):
        reply = client.infer(obs)
        np.testing.assert_allclose(reply["actions"], actions, rtol=0, atol=1e-6)
      # The base camera is the one the model reads: the other cameras do not change the actions.
      other = openpi_example(name, seed=7)
      mixed = {k: other[k] if "wrist" in k else v for k, v in requests[0].items()}
      if name == "aloha":
        mixed["images"] = dict(other["images"], cam_high=requests[0]["images"]["cam_high"])
      np.testing.assert_allclose(client.infer(mixed)["actions"], expected[0], atol=1e-6)
      # The policy's own keys are not this layout: the error names the layout's keys.
      with pytest.raises(RuntimeError, match=f"Bad request: .*the server expects the {name} "
                                             "layout"):
        client.infer(observation(seed=0, dataset="fractal20220817_data"))
  assert np.abs(expected[0] - expected[1]).max() > 1e-4


# --- Batching across clients ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def batching_server(tiny_policy_dirs, tmp_path_factory):
  """A batch waits (up to an hour) until every connected client has a request in it."""
  with _serving(tmp_path_factory.mktemp("batching"), f"--bundle={tiny_policy_dirs.bundle_dir}",
                "--max_batch=8", "--batch_window_ms=3600000") as (child, port):
    yield child, port


@pytest.mark.parametrize("num_clients", [3, 8])
def test_batched_replies_equal_one_at_a_time_replies(batching_server, policy, num_clients):
  _, port = batching_server
  datasets = ("bridge_dataset", "fractal20220817_data")
  requests = [dict(observation(seed=40 + c, dataset=datasets[c % 2], image_shape=(64 + 8 * c, 96),
                               instruction=f"task {c}"), seed=1000 + c)
              for c in range(num_clients)]
  expected = [policy.infer(o)["actions"] for o in requests]  # One at a time.
  batches_before = _metric(port, "batches")
  start, replies, errors = threading.Barrier(num_clients), {}, []

  def run(c, client):
    try:
      start.wait(timeout=HANG_S)
      replies[c] = client.infer(requests[c])
    except BaseException as e:  # pytest's failures are BaseExceptions; reported below.
      errors.append(e)

  with contextlib.ExitStack() as stack:
    clients = [stack.enter_context(_client(port)) for _ in range(num_clients)]
    threads = [threading.Thread(target=run, args=(c, client)) for c, client in enumerate(clients)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=HANG_S)
  assert not errors, errors
  # bridge (7 actions) and fractal (7 actions) share a width: one batch of all clients.
  assert _metric(port, "batches") == batches_before + 1
  for c in range(num_clients):
    assert replies[c]["server_timing"]["batch_size"] == num_clients
    np.testing.assert_allclose(replies[c]["actions"], expected[c], rtol=0, atol=1e-6)


def test_a_bad_request_in_a_batch_fails_alone(batching_server, policy):
  _, port = batching_server
  good = observation(seed=50)
  with _client(port) as first, _client(port) as second:
    result = {}
    sender = threading.Thread(target=lambda: result.update(first.infer(good)))
    sender.start()
    with pytest.raises(RuntimeError, match="Bad request: .*'kuka' is unknown"):
      second.infer(bad_observation(dataset="kuka"))
    sender.join(timeout=HANG_S)
  np.testing.assert_allclose(result["actions"], policy.infer(good)["actions"], atol=1e-6)
  assert result["server_timing"]["batch_size"] == 1  # The bad one never reached the model.


# --- Fuzzing: no internal error, traceback or path reaches a client ------------------------------

FUZZ_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "int64", "uint64",
               "float16", "float32", "float64")


def _fuzz_value(rng, depth=0):
  """A random value: scalars, strings, bytes, nested (ragged) lists and dicts, numpy arrays of
  random dtypes and shapes (empty, huge, high rank)."""
  kind = int(rng.integers(12 if depth < 2 else 8))
  if kind == 0:
    return None
  if kind == 1:
    return bool(rng.integers(2))
  if kind == 2:
    return int(rng.choice([0, -1, 7, 2**31, 2**32, 2**63 - 1, -2**63]))
  if kind == 3:
    return float(rng.choice([0.0, -1.5, np.nan, np.inf, 1e308]))
  if kind == 4:
    return str(rng.choice(["", "put the carrot", "x" * 5000, "ünïcødé ✓", "bridge_dataset"]))
  if kind == 5:
    return rng.bytes(int(rng.integers(0, 64)))
  if kind in (6, 7):
    dtype = np.dtype(FUZZ_DTYPES[int(rng.integers(len(FUZZ_DTYPES)))])
    rank = int(rng.integers(0, 5))
    shape = tuple(int(rng.choice([0, 1, 2, 3, 7, 64, 300])) for _ in range(rank))
    if np.prod(shape) * dtype.itemsize > 400_000:
      shape = shape[:1]
    return (rng.random(shape) * 300).astype(dtype)
  if kind in (8, 9):
    return [_fuzz_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
  if kind == 10:
    return [[float(x) for x in rng.random(int(rng.integers(0, 4)))] for _ in range(3)]
  return {str(rng.choice(["image", "state", "a", "images", "cam_high"])): _fuzz_value(
      rng, depth + 1) for _ in range(int(rng.integers(0, 3)))}


def fuzz_request(rng) -> object:
  """A valid observation with some keys replaced, deleted or added, or something else."""
  roll = rng.random()
  if roll < 0.05:
    return _fuzz_value(rng)  # Not an observation at all.
  obs = observation(seed=int(rng.integers(1000)),
                    dataset=("bridge_dataset", "fractal20220817_data")[int(rng.integers(2))],
                    image_shape=(int(rng.integers(1, 80)), int(rng.integers(1, 80))))
  keys = ["image", "state", "instruction", "dataset", "seed"]
  for _ in range(int(rng.integers(1, 3))):
    key = keys[int(rng.integers(len(keys)))]
    action = rng.random()
    if action < 0.15:
      obs.pop(key, None)
    elif action < 0.25:
      obs[str(rng.choice(["extra", "new_episode", "images"]))] = _fuzz_value(rng)
    else:
      obs[key] = _fuzz_value(rng)
  return obs


def _fuzz(port, num_cases, seed):
  rng = np.random.default_rng(seed)
  counts = dict(actions=0, bad=0)
  with _raw(port) as raw:
    for case in range(num_cases):
      request = fuzz_request(rng)
      raw.send(msgpack_numpy.packb(request))
      reply = raw.recv(timeout=HANG_S)
      if isinstance(reply, bytes):
        actions = msgpack_numpy.unpackb(reply)["actions"]
        assert actions.shape == (16, 7) and np.isfinite(actions).all(), (case, request)
        counts["actions"] += 1
        continue
      assert reply.startswith("Bad request: "), (case, reply)
      for leak in ("Traceback", ".py", 'File "', "site-packages", "Internal error"):
        assert leak not in reply, (case, reply)
      counts["bad"] += 1
  return counts


def test_fuzzed_requests_get_actions_or_named_errors(server, policy):
  _, port = server
  counts = _fuzz(port, 300, seed=0)
  assert counts["actions"] > 0 and counts["bad"] > 100, counts
  good = observation(seed=9)
  with _client(port) as client:
    np.testing.assert_allclose(client.infer(good)["actions"], policy.infer(good)["actions"],
                               atol=1e-6)


@pytest.mark.slow
def test_many_fuzzed_requests(server):
  _, port = server
  counts = _fuzz(port, 5000, seed=1)
  assert counts["actions"] > 0 and counts["bad"] > 2000, counts
