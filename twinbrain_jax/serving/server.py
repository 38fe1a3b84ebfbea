"""A websocket policy server that openpi's `WebsocketClientPolicy` talks to unchanged.

Protocol (openpi's): on connect the server sends the policy's metadata (a msgpack dict); then
each request is one observation dict (`wire.pack`) and each reply a dict
`{"actions": [T, A] float32, "server_timing": {...}}`. A bad request gets a text frame naming
the problem (openpi's client raises it as `RuntimeError`) and the connection stays open for
the next request. `GET /healthz` answers `OK` once the policy is compiled and listening.

Concurrency: every connection is a coroutine on one event loop; inference (unpacking,
preprocessing, the device, postprocessing) runs on one worker thread, a FIFO queue shared by all
clients, so requests never interleave on the device, and a slow or dead client only ever blocks
its own coroutine. Each observation's noise comes from its own seed, so a reply does not depend
on the other clients.

Message size: a request larger than `max_message_bytes` gets an error reply; one larger than
`HARD_LIMIT_FACTOR` times that is refused by the websocket layer before it is read (the
connection closes with code 1009, "message too big").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from absl import logging
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from twinbrain_jax.serving import wire
from twinbrain_jax.serving.policy import ObservationError, Policy

HEALTH_PATH = "/healthz"
HARD_LIMIT_FACTOR = 4


def _peer(connection: ServerConnection) -> str:
  address = connection.remote_address
  return f"{address[0]}:{address[1]}" if address else "unknown"


class PolicyServer:
  """Serves one `Policy` to any number of websocket clients (see the module docstring)."""

  def __init__(self, policy: Policy, host: str = "0.0.0.0", port: int = 8000,
               max_message_bytes: int = 64 << 20):
    self.policy, self.host, self.port = policy, host, port
    self.max_message_bytes = max_message_bytes
    self.metadata = dict(policy.metadata(), max_message_bytes=max_message_bytes)
    # One thread: the device queue all clients share.
    self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")

  def _infer(self, message: bytes, received: float, prev_total_ms: float | None) -> bytes:
    """One request on the device thread: unpack, infer, pack the reply."""
    started = time.perf_counter()
    result = self.policy.infer(wire.unpack(message))
    timing = dict(result["policy_timing"], queue_ms=1e3 * (started - received))
    if prev_total_ms is not None:  # openpi's field: the previous request's time in the server.
      timing["prev_total_ms"] = prev_total_ms
    return wire.pack(dict(actions=result["actions"], server_timing=timing))

  async def _reply(self, message: bytes | str, prev_total_ms: float | None) -> bytes:
    received = time.perf_counter()
    if isinstance(message, str):
      raise wire.WireError("the request is a text frame; send msgpack bytes (binary frames).")
    if len(message) > self.max_message_bytes:
      raise wire.WireError(
          f"the request has {len(message)} bytes, more than the server's limit of "
          f"{self.max_message_bytes} (serve.py --max_message_mb); send smaller images.")
    return await asyncio.get_running_loop().run_in_executor(
        self._device, self._infer, message, received, prev_total_ms)

  async def _handle(self, connection: ServerConnection) -> None:
    peer = _peer(connection)
    logging.info("client %s connected", peer)
    prev_total_ms = None
    try:
      await connection.send(wire.pack(self.metadata))
      async for message in connection:
        start = time.perf_counter()
        try:
          reply = await self._reply(message, prev_total_ms)
        except (wire.WireError, ObservationError) as e:
          logging.warning("client %s: bad request: %s", peer, e)
          reply = f"Bad request: {e}"
        except Exception as e:  # A bug: tell the client, keep serving everyone.
          logging.exception("client %s: inference failed", peer)
          reply = f"Internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        await connection.send(reply)
        prev_total_ms = 1e3 * (time.perf_counter() - start)
    except ConnectionClosed:
      pass
    logging.info("client %s disconnected", peer)

  @staticmethod
  def _health(connection: ServerConnection, request) -> Any:
    if request.path == HEALTH_PATH:
      return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None

  async def serve(self, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then closes every connection and returns."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
      loop.add_signal_handler(signum, stop.set)
    async with serve(self._handle, self.host, self.port, process_request=self._health,
                     compression=None,
                     max_size=HARD_LIMIT_FACTOR * self.max_message_bytes) as server:
      host, port = server.sockets[0].getsockname()[:2]
      if on_ready:
        on_ready(host, port)
      await stop.wait()
      logging.info("stopping: closing connections")
    self._device.shutdown(wait=True, cancel_futures=True)
