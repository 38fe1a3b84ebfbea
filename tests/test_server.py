"""scripts/serve.py as a subprocess on loopback, driven by the real openpi-client package."""

import contextlib
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
from fixtures_serving import REPO, bad_observation, observation, tiny_policy_dirs  # noqa: F401
from twinbrain_jax.serving.policy import Policy

# openpi-client 0.1.2 connects without a context manager, which websockets 17 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

HANG_S = 300  # Only catches a hang: a loaded 2-core machine compiles slowly.
MAX_MESSAGE_MB = 1  # Small, so that "too large" requests are cheap to send.


@contextlib.contextmanager
def _serving(log_dir, *flags):
  """Runs scripts/serve.py on a free loopback port until the block exits; yields (child, port)."""
  args = [sys.executable, "scripts/serve.py", "--host=127.0.0.1", "--port=0",
          f"--max_message_mb={MAX_MESSAGE_MB}", *flags]
  with processes.started(args, log_dir, cwd=REPO) as child:
    child.wait_for(lambda: "serving on ws://" in child.stdout, "the server listening", HANG_S)
    port = int(re.search(r"serving on ws://127\.0\.0\.1:(\d+)", child.stdout).group(1))
    yield child, port


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
                                                max_message_bytes=MAX_MESSAGE_MB << 20)
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


def _soak_with_memory(server, policy, record_property, requests_per_client):
  child, port = server
  process = psutil.Process(child.proc.pid)
  _soak(port, policy, 8, 10, seed=0)  # Warm-up: allocator pools, first connections.
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
  # A leak of a request's arrays (>= 40 kB each) would grow by far more over the soak.
  assert growth_mib < 32 + 0.01 * (valid + malformed), growth_mib
  good = observation(seed=9)
  with _client(port) as client:
    np.testing.assert_allclose(client.infer(good)["actions"], policy.infer(good)["actions"],
                               atol=1e-6)


def test_short_soak_of_valid_and_malformed_requests(server, policy, record_property):
  _soak_with_memory(server, policy, record_property, requests_per_client=25)


@pytest.mark.slow
def test_long_soak_keeps_memory_flat(server, policy, record_property):
  _soak_with_memory(server, policy, record_property, requests_per_client=500)


def test_checkpoint_server_stops_cleanly_on_sigterm(tiny_policy_dirs, tmp_path, policy):
  with _serving(tmp_path, f"--checkpoint={tiny_policy_dirs.checkpoint_dir}") as (child, port):
    obs = observation(seed=12)
    with _client(port) as client:
      np.testing.assert_allclose(client.infer(obs)["actions"], policy.infer(obs)["actions"],
                                 atol=1e-5)
      child.proc.send_signal(signal.SIGTERM)
      assert child.wait(HANG_S) == 0, child.stderr[-3000:]
    assert "stopped" in child.stdout
