"""A websocket policy server that openpi's `WebsocketClientPolicy` talks to unchanged.

Protocol (openpi's): on connect the server sends the policy's metadata (a msgpack dict); then
each request is one observation dict (`wire.pack`) and each reply a dict
`{"actions": [T, A] float32, "server_timing": {...}}`. The observation's keys follow the
server's observation format (`serving.formats`: the policy's own, or openpi's LIBERO / DROID /
ALOHA layouts). `GET /healthz` answers `OK` once the policy is compiled and listening;
`GET /status` gives counters as JSON (connections, requests pending, batches run).

Errors: a bad request gets a text frame "Bad request: ..." naming the problem (openpi's client
raises it as `RuntimeError`); anything else that fails gets "Internal error <id>: ..." while the
traceback goes to the server's log under that id, never to the client. The connection stays
open for the next request either way.

Concurrency and batching: every connection is a coroutine on one event loop, and answers one
request at a time. Requests go into one queue; a batcher takes the first, then every request
that arrives within `batch_window_ms` (stopping early at `max_batch`, or once every connected
client has a request waiting), and runs them as one batch on the single device thread
(unpacking, preprocessing, the device, postprocessing), so requests never interleave on the
device and a slow or dead client only ever blocks its own coroutine. Each observation's noise
comes from its own seed, so a reply does not depend on the other requests of its batch (equal
to a one-at-a-time reply to float rounding, ~1e-6).

Shutdown: on SIGTERM or SIGINT the server stops accepting connections, answers requests that
arrive after it with "Unavailable: ...", delivers the replies of the requests already received
(waiting at most `drain_timeout_s`; a second signal stops waiting), then closes every
connection (1001, going away) and returns.

Message size: a request larger than `max_message_bytes` gets an error reply; one larger than
`HARD_LIMIT_FACTOR` times that is refused by the websocket layer before it is read (the
connection closes with code 1009, "message too big").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import http
import json
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from twinbrain_jax.serving import formats, wire
from twinbrain_jax.serving.policy import ObservationError, Policy

HEALTH_PATH = "/healthz"
STATUS_PATH = "/status"
HARD_LIMIT_FACTOR = 4
SHUTTING_DOWN = ("Unavailable: the server is shutting down and takes no new requests; connect to "
                 "a running server.")


def _peer(connection: ServerConnection) -> str:
  address = connection.remote_address
  return f"{address[0]}:{address[1]}" if address else "unknown"


@dataclasses.dataclass
class _Request:
  """One received request on its way through the queue."""
  message: bytes
  peer: str
  received: float  # time.perf_counter() when it was read off the socket
  prev_total_ms: float | None  # openpi's field: the connection's previous request in the server
  reply: asyncio.Future  # -> bytes (actions) or str (an error)


@dataclasses.dataclass
class _Ready:
  """A request whose observation passed the checks."""
  index: int
  observation: Any  # in the policy's own keys
  action_dim: int


class PolicyServer:
  """Serves one `Policy` to any number of websocket clients (see the module docstring).

  Args:
    obs_format: a name of `formats.FORMATS`: how clients lay out their observations.
    max_batch: the most requests run as one batch (capped by the policy's `max_batch_size`;
      1 = one request at a time).
    batch_window_ms: how long the batcher waits for more requests after the first.
    drain_timeout_s: on shutdown, the longest wait for the replies of requests in flight.
  """

  def __init__(self, policy: Policy, host: str = "0.0.0.0", port: int = 8000,
               max_message_bytes: int = 64 << 20, *, obs_format: str = "twinbrain",
               max_batch: int = 8, batch_window_ms: float = 2.0, drain_timeout_s: float = 30.0):
    if max_batch < 1 or batch_window_ms < 0 or drain_timeout_s < 0:
      raise ValueError(f"max_batch={max_batch} must be >= 1, batch_window_ms={batch_window_ms} "
                       f"and drain_timeout_s={drain_timeout_s} >= 0.")
    self.policy, self.host, self.port = policy, host, port
    self.max_message_bytes = max_message_bytes
    self.format = formats.get_format(obs_format)
    self.max_batch = min(max_batch, policy.max_batch_size)
    self.batch_window_s = batch_window_ms / 1e3
    self.drain_timeout_s = drain_timeout_s
    self.metadata = dict(policy.metadata(), max_message_bytes=max_message_bytes,
                         obs_format=self.format.name, max_batch=self.max_batch,
                         batch_window_ms=batch_window_ms)
    if not self.format.native:
      self.metadata["observation_keys"] = self.format.describe()
    # One thread: the device queue all clients share.
    self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
    self._queue: asyncio.Queue[_Request] | None = None
    self._connections = 0
    self._pending = 0  # Requests received and not yet answered.
    self._idle: asyncio.Event | None = None
    self._flush: asyncio.Event | None = None  # Set on shutdown: batches stop waiting.
    self._draining = False
    self._batches = self._batched_requests = 0

  # --- The device thread ---------------------------------------------------------------------

  @staticmethod
  def _bad_request(peer: str, error: Exception) -> str:
    """Logs a bad request with its client; the reply names the problem."""
    logging.warning("client %s: bad request: %s", peer, error)
    return f"Bad request: {error}"

  @staticmethod
  def _internal_error(peers: Sequence[str]) -> str:
    """Logs the exception being handled under a new id; the client's reply names only the id."""
    error_id = uuid.uuid4().hex[:12]
    logging.exception("internal error %s (clients %s)", error_id, ", ".join(peers))
    return (f"Internal error {error_id}: the server failed on this request; its log has the "
            "details under this id.")

  def _prepare(self, index: int, request: _Request) -> _Ready:
    """Unpacks and checks one request (`WireError` / `ObservationError` when it is bad)."""
    observation = formats.to_policy_observation(self.format, wire.unpack(request.message))
    try:
      checked = self.policy.check(observation)
    except ObservationError as e:
      raise self.format.explain(e) from None
    return _Ready(index, observation, self.policy.datasets[checked.dataset].action_dim)

  def _infer_group(self, requests: Sequence[_Request], group: Sequence[_Ready], started: float,
                   replies: list[bytes | str | None]) -> None:
    """Runs checked requests of one action width as one batch; fills `replies`."""
    try:
      result = self.policy.infer_batch([r.observation for r in group])
    except ObservationError as e:
      if len(group) == 1:
        replies[group[0].index] = self._bad_request(requests[group[0].index].peer, e)
        return
      for ready in group:  # Find which request it was (a prompt too long for the model).
        self._infer_group(requests, [ready], started, replies)
      return
    except Exception:  # pylint: disable=broad-except
      reply = self._internal_error([requests[r.index].peer for r in group])
      for ready in group:
        replies[ready.index] = reply
      return
    for row, ready in enumerate(group):
      request = requests[ready.index]
      timing = dict(result["policy_timing"], queue_ms=1e3 * (started - request.received),
                    batch_size=len(group))
      if request.prev_total_ms is not None:
        timing["prev_total_ms"] = request.prev_total_ms
      replies[ready.index] = wire.pack(dict(actions=result["actions"][row],
                                            server_timing=timing))

  def _run_batch(self, requests: Sequence[_Request]) -> list[bytes | str]:
    """One batch on the device thread: a reply (packed actions or an error text) per request."""
    started = time.perf_counter()
    replies: list[bytes | str | None] = [None] * len(requests)
    groups: dict[int, list[_Ready]] = collections.defaultdict(list)
    for index, request in enumerate(requests):
      try:
        ready = self._prepare(index, request)
      except (wire.WireError, ObservationError) as e:
        replies[index] = self._bad_request(request.peer, e)
      except Exception:  # pylint: disable=broad-except
        replies[index] = self._internal_error([request.peer])
      else:
        groups[ready.action_dim].append(ready)
    for group in groups.values():  # The policy batches one action width at a time.
      self._infer_group(requests, group, started, replies)
    return replies

  # --- The event loop ------------------------------------------------------------------------

  async def _batcher(self) -> None:
    """Takes requests off the queue in batches and runs them on the device thread."""
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self._queue.get()]
      deadline = loop.time() + self.batch_window_s
      while len(batch) < self.max_batch:
        if not self._queue.empty():
          batch.append(self._queue.get_nowait())
          continue
        # Every connection answers one request at a time: once each has one waiting, no more
        # can come. A shutdown runs what is waiting at once.
        if (self._connections <= len(batch) or loop.time() >= deadline
            or self._flush.is_set()):
          break
        getting = asyncio.ensure_future(self._queue.get())
        flushing = asyncio.ensure_future(self._flush.wait())
        await asyncio.wait((getting, flushing), timeout=deadline - loop.time(),
                           return_when=asyncio.FIRST_COMPLETED)
        flushing.cancel()
        if getting.done():
          batch.append(getting.result())
        else:
          getting.cancel()
          break
      self._batches += 1
      self._batched_requests += len(batch)
      try:
        replies = await loop.run_in_executor(self._device, self._run_batch, batch)
      except Exception:  # pylint: disable=broad-except  (the executor itself failed)
        replies = [self._internal_error([r.peer for r in batch])] * len(batch)
      for request, reply in zip(batch, replies):
        if not request.reply.done():
          request.reply.set_result(reply)

  def _check_frame(self, message: bytes | str) -> None:
    if isinstance(message, str):
      raise wire.WireError("the request is a text frame; send msgpack bytes (binary frames).")
    if len(message) > self.max_message_bytes:
      raise wire.WireError(
          f"the request has {len(message)} bytes, more than the server's limit of "
          f"{self.max_message_bytes} (serve.py --max_message_mb); send smaller images.")

  async def _answer(self, message: bytes | str, peer: str, prev_total_ms: float | None
                    ) -> bytes | str:
    received = time.perf_counter()
    try:
      self._check_frame(message)
    except wire.WireError as e:
      return self._bad_request(peer, e)
    request = _Request(message, peer, received, prev_total_ms,
                       asyncio.get_running_loop().create_future())
    await self._queue.put(request)
    return await request.reply

  async def _handle(self, connection: ServerConnection) -> None:
    peer = _peer(connection)
    logging.info("client %s connected", peer)
    self._connections += 1
    prev_total_ms = None
    try:
      await connection.send(wire.pack(self.metadata))
      async for message in connection:
        if self._draining:
          await connection.send(SHUTTING_DOWN)
          continue
        start = time.perf_counter()
        self._pending += 1
        self._idle.clear()
        try:
          reply = await self._answer(message, peer, prev_total_ms)
          await connection.send(reply)
        finally:
          self._pending -= 1
          if not self._pending:
            self._idle.set()
        prev_total_ms = 1e3 * (time.perf_counter() - start)
    except ConnectionClosed:
      pass
    finally:
      self._connections -= 1
    logging.info("client %s disconnected", peer)

  def status(self) -> dict[str, int]:
    """Counters for `GET /status`: open connections, requests received and not yet answered,
    batches run and requests they held."""
    return dict(connections=self._connections, pending=self._pending, batches=self._batches,
                batched_requests=self._batched_requests)

  def _http(self, connection: ServerConnection, request) -> Any:
    if request.path == HEALTH_PATH:
      return connection.respond(http.HTTPStatus.OK, "OK\n")
    if request.path == STATUS_PATH:
      return connection.respond(http.HTTPStatus.OK, json.dumps(self.status()) + "\n")
    return None

  async def serve(self, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then drains (see the module docstring) and returns."""
    loop = asyncio.get_running_loop()
    self._queue, self._idle, self._flush = asyncio.Queue(), asyncio.Event(), asyncio.Event()
    self._idle.set()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal():
      (force if stop.is_set() else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
      loop.add_signal_handler(signum, on_signal)
    batcher = asyncio.create_task(self._batcher())
    try:
      async with serve(self._handle, self.host, self.port, process_request=self._http,
                       compression=None,
                       max_size=HARD_LIMIT_FACTOR * self.max_message_bytes) as server:
        host, port = server.sockets[0].getsockname()[:2]
        if on_ready:
          on_ready(host, port)
        await stop.wait()
        self._draining = True
        self._flush.set()
        server.server.close()  # Stop accepting; open connections stay until their replies.
        logging.info("stopping: delivering %d replies in flight", self._pending)
        waits = [asyncio.create_task(e.wait()) for e in (self._idle, force)]
        done, _ = await asyncio.wait(waits, timeout=self.drain_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
          task.cancel()
        while not self._queue.empty():  # Not started yet: they get no actions.
          request = self._queue.get_nowait()
          request.reply.set_result(SHUTTING_DOWN)
        if self._pending:
          logging.warning("stopping with %d requests unanswered (%s)", self._pending,
                          "second signal" if done else f"{self.drain_timeout_s} s drain timeout")
        logging.info("stopping: closing connections")
    finally:
      batcher.cancel()
      for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
      self._device.shutdown(wait=True, cancel_futures=True)
