"""Serves a policy over websockets in openpi's wire format (openpi-client works unchanged).

  python scripts/serve.py --bundle=/ckpt/run1/bundle --port=8000
  python scripts/serve.py --checkpoint=/ckpt/run1/checkpoints --port=8000 --obs_format=libero

`--obs_format` says how clients lay out their observations: `twinbrain` (the policy's own keys)
or openpi's `libero`, `droid`, `aloha` (their example clients work unchanged); default the one
recorded in the bundle (`scripts/export.py --obs_format`), else `twinbrain`. Requests of several
clients that arrive within `--batch_window_ms` run as one batch of up to `--max_batch`.

A Libra-VLA bundle is served with its runtime, `--libra_mode=interleaved` (the paper's) or
`--libra_mode=async` (planner in a background thread), one chunk of H actions per request.

`--port=0` takes a free port; the line `serving on ws://HOST:PORT` says which. The policy is
compiled (every batch size it will serve) before the server listens, so `GET /healthz` answering
`OK` means ready. On SIGTERM or Ctrl-C it stops accepting, delivers the replies in flight (at
most `--drain_timeout_s`), and exits with status 0.
"""

import asyncio
import logging
import sys

from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.serving import formats
from twinbrain_jax.serving.policy import Policy, batch_bucket
from twinbrain_jax.serving.server import PolicyServer

_BUNDLE = flags.DEFINE_string("bundle", None, "An inference bundle (scripts/export.py).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or a training run's checkpoint dir.")
_STEP = flags.DEFINE_integer("step", None, "With --checkpoint: the step; default the latest.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None,
                                 "With --checkpoint: default the run's init.tokenizer.")
_HOST = flags.DEFINE_string("host", "0.0.0.0", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port; 0 picks a free one.")
_OBS_FORMAT = flags.DEFINE_enum("obs_format", None, sorted(formats.FORMATS),
                                "Observation layout of the clients; default the bundle's "
                                "recorded one, else twinbrain.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset (embodiment) of observations that name "
                               "none; default the policy's only one.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed of observations that carry none.")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                           "Compute dtype; default the config's.")
_LIBRA_MODE = flags.DEFINE_enum("libra_mode", None, ["interleaved", "async"],
                                "Libra bundles: the runtime (default the config's runtime.mode).")
_MAX_MESSAGE_MB = flags.DEFINE_float("max_message_mb", 64, "Larger requests get an error reply.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most requests of several clients run as one "
                                  "batch (1: one at a time; Libra: always 1).", lower_bound=1)
_BATCH_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 2.0, "How long a batch waits for more "
                                      "requests after its first.", lower_bound=0)
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM: the longest wait for "
                                      "the replies of requests in flight.", lower_bound=0)


def main(argv):
  del argv
  # Our log names the client of every connection and bad request; websockets' says less.
  logging.getLogger("websockets").setLevel(logging.WARNING)
  if (_BUNDLE.value is None) == (_CHECKPOINT.value is None):
    sys.exit("error: pass exactly one of --bundle and --checkpoint.")
  libra = {} if _LIBRA_MODE.value is None else dict(mode=_LIBRA_MODE.value)
  try:
    policy = Policy.load(_BUNDLE.value or _CHECKPOINT.value, step=_STEP.value,
                         tokenizer_dir=_TOKENIZER.value, compute_dtype=_DTYPE.value,
                         seed=_SEED.value, default_dataset=_DATASET.value,
                         max_batch_size=batch_bucket(_MAX_BATCH.value), **libra)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  obs_format = (_OBS_FORMAT.value or policy.bundle.config.get("serving", {}).get("obs_format")
                or "twinbrain")
  try:
    server = PolicyServer(policy, _HOST.value, _PORT.value, int(_MAX_MESSAGE_MB.value * 2**20),
                          obs_format=obs_format, max_batch=_MAX_BATCH.value,
                          batch_window_ms=_BATCH_WINDOW_MS.value,
                          drain_timeout_s=_DRAIN_TIMEOUT_S.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  sizes = [1 << i for i in range(batch_bucket(server.max_batch).bit_length())]
  compile_s = sum(policy.warmup(sizes).values())
  print(f"compiled the sampler for batches {sizes} in {compile_s:.1f} s; datasets "
        f"{sorted(policy.datasets)}; observation format {obs_format}", flush=True)
  ready = lambda host, port: print(f"serving on ws://{host}:{port}", flush=True)
  asyncio.run(server.serve(on_ready=ready))
  print("stopped", flush=True)


if __name__ == "__main__":
  cli.run(main, info_logs=False)
