"""The wire format against openpi-client's own msgpack_numpy, and strict unpacking."""

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy

from twinbrain_jax.serving import wire


def test_round_trips_with_openpi_client():
  obs = dict(image=np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
             state=np.linspace(-1, 1, 7, dtype=np.float32), instruction="open the drawer",
             seed=np.int64(5), cameras=[np.ones((1, 1, 3), np.uint8)], flag=np.bool_(True))
  got = wire.unpack(msgpack_numpy.packb(obs))
  assert got.keys() == obs.keys() and got["instruction"] == "open the drawer"
  for key in ("image", "state"):
    assert got[key].dtype == obs[key].dtype
    np.testing.assert_array_equal(got[key], obs[key])
  assert got["seed"] == 5 and got["seed"].dtype == np.int64 and got["flag"] is np.True_
  np.testing.assert_array_equal(got["cameras"][0], obs["cameras"][0])
  reply = dict(actions=np.random.default_rng(0).normal(size=(16, 7)).astype(np.float32),
               server_timing=dict(model_ms=1.5))
  back = msgpack_numpy.unpackb(wire.pack(reply))
  np.testing.assert_array_equal(back["actions"], reply["actions"])
  assert back["server_timing"] == {"model_ms": 1.5}


def _array(data, dtype, shape):
  return msgpack.packb({"image": {b"__ndarray__": True, b"data": data, b"dtype": dtype,
                                  b"shape": shape}})


@pytest.mark.parametrize("message, error", [
    (b"", "not msgpack"),
    (b"\xc1\xc1\xc1", "not msgpack"),
    (b"\x93\x01\x02", "not msgpack"),  # A truncated array.
    (msgpack.packb([1, 2]), "holds a list; send a dict"),
    (msgpack.packb({1: 2}), "not msgpack"),  # Non-string map keys.
    (_array(b"\x00" * 5, "<f4", [2]),
     r"shape \(2,\) and dtype float32 needs 8 bytes but carries 5"),
    (_array(b"\x00" * 8, "|O", [1]), "dtype object; send bool, int, uint or float"),
    (_array(b"\x00" * 8, "nonsense", [8]), "invalid dtype"),
    (_array(b"\x00" * 8, "|u1", [-8]), "non-negative int `shape`"),
    (_array("text", "|u1", [4]), "needs bytes `data`"),
    (msgpack.packb({"s": {b"__npgeneric__": True, b"data": "x", b"dtype": "<i8"}}),
     "carries a str"),
])
def test_garbage_is_a_named_wire_error(message, error):
  with pytest.raises(wire.WireError, match=error):
    wire.unpack(message)
