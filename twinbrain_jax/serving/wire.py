"""openpi's wire format: msgpack, with numpy arrays and scalars as tagged maps.

    array   {b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [H, W, 3]}
    scalar  {b"__npgeneric__": True, b"data": <Python number>, b"dtype": "<i8"}

This is what `openpi_client.msgpack_numpy` writes and reads, so its `WebsocketClientPolicy` talks
to this server unchanged. Unpacking is strict, because requests come from the network: only
bool / int / uint / float arrays whose byte count matches their shape, string map keys, and a
dict at the top; anything else is a `WireError` naming the problem.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

ARRAY_KINDS = "biuf"


class WireError(ValueError):
  """A message that is not a msgpack dict in openpi's format."""


def _encode(obj: Any) -> Any:
  if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in ARRAY_KINDS:
    raise TypeError(f"Cannot send numpy dtype {obj.dtype} (only bool, int, uint, float).")
  if isinstance(obj, np.ndarray):
    return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
            b"shape": obj.shape}
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  raise TypeError(f"Cannot send a {type(obj).__name__}.")


def pack(obj: Any) -> bytes:
  """Packs dicts, lists, strings, numbers and numpy arrays."""
  return msgpack.packb(obj, default=_encode)


def _dtype(value: Any) -> np.dtype:
  try:
    dtype = np.dtype(value.decode() if isinstance(value, bytes) else value)
  except (TypeError, ValueError, UnicodeDecodeError) as e:
    raise WireError(f"an array has an invalid dtype {value!r} ({e}).") from None
  if dtype.kind not in ARRAY_KINDS:
    raise WireError(f"an array has dtype {dtype}; send bool, int, uint or float arrays.")
  return dtype


def _decode(obj: dict) -> Any:
  if b"__ndarray__" in obj:
    dtype, data, shape = _dtype(obj.get(b"dtype")), obj.get(b"data"), obj.get(b"shape")
    if not isinstance(data, bytes) or not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and s >= 0 for s in shape):
      raise WireError("an array is malformed: it needs bytes `data` and a list of "
                      "non-negative int `shape`.")
    if math.prod(shape) * dtype.itemsize != len(data):
      raise WireError(f"an array of shape {tuple(shape)} and dtype {dtype} needs "
                      f"{math.prod(shape) * dtype.itemsize} bytes but carries {len(data)}.")
    return np.frombuffer(data, dtype).reshape(shape)
  if b"__npgeneric__" in obj:
    dtype, data = _dtype(obj.get(b"dtype")), obj.get(b"data")
    if isinstance(data, (bytes, str, list, dict)) or data is None:
      raise WireError(f"a numpy scalar of dtype {dtype} carries a {type(data).__name__}.")
    try:
      return dtype.type(data)
    except (TypeError, ValueError, OverflowError) as e:
      raise WireError(f"a numpy scalar of dtype {dtype} cannot hold {data!r} ({e}).") from None
  return obj


def unpack(message: bytes) -> dict[str, Any]:
  """The dict a client packed; `WireError` for anything else."""
  try:
    obj = msgpack.unpackb(message, object_hook=_decode, raw=False)
  except WireError:
    raise
  except Exception as e:  # msgpack raises many types for garbage (ExtraData, FormatError, ...).
    raise WireError(f"the message is not msgpack ({type(e).__name__}: {e}); send "
                    "openpi_client.msgpack_numpy.packb(observation_dict).") from None
  if not isinstance(obj, dict):
    raise WireError(f"the message holds a {type(obj).__name__}; send a dict (the observation).")
  return obj
