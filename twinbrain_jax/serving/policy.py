"""A policy: raw observations -> un-normalised action chunks, with the training preprocessing.

    policy = Policy.load("/ckpt/run1/bundle")        # an exported bundle or a checkpoint dir
    out = policy.infer({"image": rgb, "state": state, "instruction": "put the carrot on the plate",
                        "dataset": "bridge_dataset"})
    out["actions"]        # [T, A] float32 in the dataset's raw action units
    out["policy_timing"]  # preprocess / model / postprocess ms (model: after the device finished)

Observation keys (one robot step; numpy arrays and Python values):
    image        uint8 RGB [H, W, 3] of any size; several cameras as a list of such arrays or
                 one [n, H, W, 3] array, primary camera first (the dataset's camera order); the
                 model reads the first `data.num_cameras` of them
    state        float [S]: the dataset's standardised proprio state in raw units, before
                 normalisation (bridge: 7, fractal: 8; see `oxe_registry.standardize_*`)
    instruction  str
    dataset      str, optional: the embodiment, i.e. whose statistics normalise the state and
                 un-normalise the actions; default `Policy.default_dataset`
    seed         int in [0, 2**32), optional: the noise seed; default the policy's `seed`

The preprocessing is the training pipeline's own functions (evaluation mode, no augmentation):
    image    transforms.resize -> transforms.pad_to_multiple     (as in pipeline.SampleBuilder)
    state    pipeline.model_state: normalise with the bundle's statistics, zero-pad
    prompts  inputs.ModelInputs: tokenisation, fixed left-padded lengths, patches, positions
and the actions are un-normalised by `export.unnormalize_actions` with the same statistics.

Every input has a fixed shape (prompts padded to `inputs.max_*_tokens`, images resized to
`data.image_size`) and batches are padded to a power of two, so the sampler compiles once per
batch bucket (1, 2, 4, ..., `max_batch_size`). Each observation's noise is drawn from its own
seed: its actions do not depend on the rest of its batch or on the requests served before it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from twinbrain_jax.data import config as data_config
from twinbrain_jax.data import normalization, pipeline, transforms
from twinbrain_jax.inputs import model_inputs_for
from twinbrain_jax.models import libra, twinbrain, vlm
from twinbrain_jax.serving.execution import ExecutionConfig
from twinbrain_jax.training import export, loop

REQUIRED_KEYS = ("image", "state", "instruction")
MAX_SEED = 2**32


class ObservationError(ValueError):
  """An observation the policy cannot use; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Observation:
  """One validated observation (see the module docstring for the keys)."""
  image: np.ndarray  # [H, W, 3] uint8, the primary camera
  state: np.ndarray  # [S] float32, raw units
  instruction: str
  dataset: str
  seed: int


def check_camera(image: Any, where: str) -> np.ndarray:
  """One camera image, checked; `where` names it in errors (e.g. "observation['image']")."""
  if not isinstance(image, np.ndarray):
    raise ObservationError(f"{where} is a {type(image).__name__}; send a numpy array.")
  if image.dtype != np.uint8:
    raise ObservationError(
        f"{where} has dtype {image.dtype}; send uint8 RGB values 0..255 (e.g. "
        "(x * 255).round().astype(np.uint8) for floats in [0, 1]).")
  if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ObservationError(f"{where} has shape {image.shape}; expected an RGB image [H, W, 3] "
                           "(channels last, H, W >= 1).")
  return image


def _cameras(image: Any) -> list[np.ndarray]:
  """The cameras of `observation["image"]`, primary first, each checked."""
  if isinstance(image, (list, tuple)) or (isinstance(image, np.ndarray) and image.ndim == 4):
    if len(image) == 0:
      raise ObservationError(f"observation['image'] holds no camera ({_shape_of(image)}); send "
                             "at least the primary camera, uint8 [H, W, 3].")
    return [check_camera(c, f"observation['image'][{i}]") for i, c in enumerate(image)]
  return [check_camera(image, "observation['image']")]


def _shape_of(value: Any) -> str:
  return f"shape {value.shape}" if isinstance(value, np.ndarray) else "an empty list"


def state_array(state: Any, where: str = "observation['state']") -> np.ndarray:
  """A state (part) as an array: a numpy array or scalar, a number, or a list of numbers;
  `where` names it in errors."""
  if isinstance(state, (list, tuple, int, float, np.generic)) and not isinstance(
      state, (bool, np.bool_)):
    try:
      state = np.asarray(state)
    except ValueError:  # A ragged nested list.
      raise ObservationError(f"{where} is a ragged nested list; send a flat list or array of "
                             "numbers.") from None
  if not isinstance(state, np.ndarray):
    raise ObservationError(f"{where} is a {type(state).__name__}; send a numpy array.")
  return state


def _sample_chunks(model: twinbrain.TwinBrainVLA, params: Any, obs: Mapping[str, jax.Array],
                   seeds: jax.Array, *, image_grid_thw: np.ndarray, num_steps: int,
                   method: str) -> jax.Array:
  """Normalised action chunks [B, T, A]; row b's noise comes from `seeds[b]` alone."""
  context_kv, context_mask = twinbrain.observation_context(model, params, obs, image_grid_thw)
  chunk = twinbrain.action_chunk_shape(model.config, 1)[1:]
  noise = jax.vmap(lambda seed: jax.random.normal(jax.random.key(seed), chunk))(seeds)
  return twinbrain.denoise(model, params, obs, context_kv, context_mask, noise, num_steps, method)


def batch_bucket(batch_size: int) -> int:
  """The padded batch size: the next power of two."""
  return 1 << (batch_size - 1).bit_length()


class Policy:
  """Observation dicts -> action chunks (see the module docstring). Not thread-safe: the server
  calls it from one device thread.

  Attributes:
    bundle: the loaded model, params, config, norm stats and tokenizer.
    inputs: the training pipeline's `ModelInputs` for this model.
    datasets: dataset name -> its schema (`data.datasets` of the run), for every dataset the
      policy has statistics of.
    default_dataset: used when an observation names none (None: observations must name one).
    compile_seconds: batch bucket -> seconds spent compiling its sampler.
  """

  def __init__(self, bundle: export.Bundle, *, seed: int = 0, default_dataset: str | None = None,
               max_batch_size: int = 8, num_steps: int | None = None,
               method: str | None = None):
    config = bundle.config
    data = config.data
    if int(data.num_cameras) != 1 or int(data.obs_history) != 1:
      raise ValueError(f"The model was trained with data.num_cameras={data.num_cameras}, "
                       f"data.obs_history={data.obs_history}; the policy (like ModelInputs) "
                       "serves one camera and one frame.")
    if not 0 <= seed < MAX_SEED:
      raise ValueError(f"seed={seed} must lie in [0, 2**32).")
    if max_batch_size < 1 or batch_bucket(max_batch_size) != max_batch_size:
      raise ValueError(f"max_batch_size={max_batch_size} must be a power of two.")
    self.bundle, self.seed, self.max_batch_size = bundle, seed, max_batch_size
    self.inputs = model_inputs_for(bundle.model.config, bundle.tokenizer,
                                   config.inputs.max_left_tokens, config.inputs.max_right_tokens,
                                   loop.image_size(data))
    self._resize_to = tuple(int(s) for s in data.image_size)
    self._pad_multiple = int(data.pad_to_multiple)
    self._state_stats = {}
    self.datasets = {}
    for entry in data_config.dataset_entries(data):  # The run's names and their schemas.
      stats = bundle.norm_stats.get(entry.name, {})
      # A co-training mixture's question-answer data (action_dim 0) has no actions to serve.
      if {"state", "action"} <= set(stats) and entry.spec.action_dim > 0:
        self.datasets[entry.name] = entry.spec
        self._state_stats[entry.name] = normalization.ArrayStats.from_json(stats["state"])
    if not self.datasets:
      raise ValueError(f"The bundle's norm stats ({sorted(bundle.norm_stats)}) hold no dataset of "
                       "its data.datasets with state and action statistics; export it from a "
                       "training run.")
    if default_dataset is None and len(self.datasets) == 1:
      default_dataset = next(iter(self.datasets))
    if default_dataset is not None and default_dataset not in self.datasets:
      raise ValueError(f"default_dataset={default_dataset!r} has no statistics in the bundle; "
                       f"choose one of {sorted(self.datasets)}.")
    self.default_dataset = default_dataset
    self.num_steps = int(num_steps or config.flow.num_steps)
    self.method = method or config.flow.method
    self.execution = ExecutionConfig.from_config_dict(config.get("execution"))
    self.compile_seconds: dict[int, float] = {}
    self._samplers: dict[int, Any] = {}

  @classmethod
  def load(cls, path: str | os.PathLike, *, step: int | None = None,
           tokenizer_dir: str | os.PathLike | None = None, compute_dtype: str | None = None,
           **kwargs) -> Policy:
    """From an exported bundle (`scripts/export.py`) or a training checkpoint directory (the
    latest or `step`'s checkpoint); `kwargs` go to the constructor. A Libra bundle gives a
    `serving.libra.LibraPolicy` (`kwargs` may then name its `mode` and `blend_steps`)."""
    bundle = export.load_bundle_or_checkpoint(path, step, tokenizer_dir, compute_dtype)
    if isinstance(bundle.model, vlm.VisionLanguageModel):
      raise ValueError(f"{path} holds a VLM (config.family='vlm'), not a policy; evaluate it with "
                       "scripts/eval_vqa.py, or load it into a VLA with init.vlm_checkpoint.")
    if isinstance(bundle.model, libra.LibraVLA):
      from twinbrain_jax.serving.libra import LibraPolicy  # It builds on this module.
      return LibraPolicy(bundle, **kwargs)
    libra_only = sorted(set(kwargs) & {"mode", "blend_steps"})
    if libra_only:
      raise ValueError(f"{path} holds a {bundle.model.config.variant} TwinBrain policy; the "
                       f"Libra-VLA runtime options ({', '.join(libra_only)}; --libra_mode in the "
                       "scripts) do not apply to it: leave them out.")
    return cls(bundle, **kwargs)

  @property
  def action_horizon(self) -> int:
    return self.bundle.model.config.action_expert.action_horizon

  @property
  def variant(self) -> str:
    return self.bundle.model.config.variant

  def metadata(self) -> dict[str, Any]:
    """What a client needs to know, as msgpack/JSON-able data."""
    return dict(
        policy="twinbrain_jax", variant=self.variant, action_horizon=self.action_horizon,
        datasets={name: dict(state_dim=spec.state_dim, action_dim=spec.action_dim)
                  for name, spec in self.datasets.items()},
        default_dataset=self.default_dataset, image_size=list(self._resize_to),
        num_cameras=1, observation_keys=dict(
            image="uint8 RGB [H, W, 3], any size (or a list of cameras, primary first)",
            state="float [state_dim of the dataset], raw units", instruction="str",
            dataset="str, optional", seed="int in [0, 2**32), optional"),
        num_steps=self.num_steps, method=self.method, seed=self.seed,
        execution=dataclasses.asdict(self.execution))

  def check(self, observation: Any) -> Observation:
    """Validates one observation; `ObservationError` names the bad key and the fix."""
    if not isinstance(observation, Mapping):
      raise ObservationError(f"The observation is a {type(observation).__name__}; send a dict "
                             f"with keys {', '.join(REQUIRED_KEYS)}.")
    missing = [k for k in REQUIRED_KEYS if k not in observation]
    if missing:
      raise ObservationError(
          f"The observation has no {', '.join(map(repr, missing))} (got keys "
          f"{sorted(map(str, observation))}); send image (uint8 [H, W, 3]), state (float [S]), "
          "instruction (str), optionally dataset (str) and seed (int).")
    dataset = observation.get("dataset")
    dataset = self.default_dataset if dataset is None else dataset
    if dataset is None:
      raise ObservationError(f"The observation names no 'dataset' and the policy has several "
                             f"({sorted(self.datasets)}); send dataset=<one of them>.")
    if not isinstance(dataset, str) or dataset not in self.datasets:
      raise ObservationError(f"observation['dataset']={dataset!r} is unknown to this policy; "
                             f"send one of {sorted(self.datasets)}.")
    spec = self.datasets[dataset]
    state = state_array(observation["state"])
    if state.dtype.kind not in "fiu":
      raise ObservationError(f"observation['state'] has dtype {state.dtype}; send numbers "
                             f"(float [{spec.state_dim}]).")
    if state.shape != (spec.state_dim,):
      raise ObservationError(
          f"observation['state'] has shape {state.shape}; dataset {dataset!r} expects "
          f"[{spec.state_dim}] (its standardised state in raw units, before normalisation).")
    state = state.astype(np.float32)
    if not np.isfinite(state).all():
      raise ObservationError(f"observation['state'] = {state} is not finite.")
    instruction = observation["instruction"]
    if not isinstance(instruction, str):
      raise ObservationError(f"observation['instruction'] is a {type(instruction).__name__}; "
                             "send the task as a str.")
    seed = observation.get("seed", self.seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
        0 <= seed < MAX_SEED):
      raise ObservationError(f"observation['seed']={seed!r}; send an int in [0, 2**32).")
    return Observation(image=_cameras(observation["image"])[0], state=state,
                       instruction=instruction, dataset=dataset, seed=int(seed))

  def preprocess_image(self, image: np.ndarray) -> np.ndarray:
    """`[h, w, 3]` uint8 of any size -> `[H, W, 3]`, as the pipeline delivers it."""
    return transforms.pad_to_multiple(transforms.resize(image, self._resize_to),
                                      self._pad_multiple)

  def pipeline_batch(self, observations: Sequence[Observation]) -> dict[str, np.ndarray]:
    """What the training pipeline would deliver for these observations (evaluation mode):
    `image [B, H, W, 3]`, `instruction [B]`, normalised padded `state [B, S_model]`."""
    width = self.inputs.config.state_dim
    return dict(
        image=np.stack([self.preprocess_image(o.image) for o in observations]),
        instruction=np.asarray([o.instruction for o in observations]),
        state=np.stack([pipeline.model_state(o.state, self._state_stats[o.dataset],
                                             self.datasets[o.dataset], width)
                        for o in observations]))

  def model_batch(self, observations: Sequence[Observation]) -> dict[str, np.ndarray]:
    """The model inputs of `observations` (host numpy), via the training `ModelInputs`."""
    try:
      return self.inputs(self.pipeline_batch(observations))
    except ValueError as e:  # A prompt longer than inputs.max_*_tokens.
      raise ObservationError(f"observation['instruction'] is too long: {e}") from e

  def _sampler(self, bucket: int, batch: Mapping[str, np.ndarray], seeds: np.ndarray):
    """The compiled sampler of a batch bucket (compiled on first use, timed)."""
    if bucket not in self._samplers:
      start = time.perf_counter()
      jitted = jax.jit(functools.partial(
          _sample_chunks, self.bundle.model, image_grid_thw=self.inputs.image_grid_thw(bucket),
          num_steps=self.num_steps, method=self.method))
      self._samplers[bucket] = jitted.lower(self.bundle.params, batch, seeds).compile()
      self.compile_seconds[bucket] = time.perf_counter() - start
    return self._samplers[bucket]

  def sample_normalized(self, batch: Mapping[str, np.ndarray], seeds: np.ndarray) -> jax.Array:
    """Normalised chunks [B, T, A] of a model batch whose size is a bucket (device finished)."""
    sampler = self._sampler(len(seeds), batch, seeds)
    return jax.block_until_ready(sampler(self.bundle.params, batch, seeds))

  def postprocess(self, normalized: np.ndarray, observations: Sequence[Observation]
                  ) -> np.ndarray:
    """Normalised chunks [B, T, A_model] -> raw actions [B, T, A] of each row's dataset."""
    return np.stack([export.unnormalize_actions(self.bundle, normalized[i], o.dataset)
                     for i, o in enumerate(observations)])

  def infer_batch(self, observations: Sequence[Any]) -> dict[str, Any]:
    """Actions for several observations: `actions [B, T, A]` and `policy_timing` (ms)."""
    if not observations:
      raise ObservationError("No observations; send at least one.")
    checked = []
    for i, observation in enumerate(observations):
      try:
        checked.append(self.check(observation))
      except ObservationError as e:
        raise (ObservationError(f"observation {i}: {e}") if len(observations) > 1 else e) from None
    widths = {self.datasets[o.dataset].action_dim for o in checked}
    if len(widths) > 1:
      raise ObservationError(f"The batch mixes datasets of action widths {sorted(widths)}; send "
                             "one batch per width.")
    timing = dict(preprocess_ms=0.0, model_ms=0.0, postprocess_ms=0.0, compile_ms=0.0)
    actions = []
    for start in range(0, len(checked), self.max_batch_size):
      part = checked[start:start + self.max_batch_size]
      actions.append(self._infer_bucket(part, timing))
    timing["infer_ms"] = timing["preprocess_ms"] + timing["model_ms"] + timing["postprocess_ms"]
    return dict(actions=np.concatenate(actions), policy_timing=timing)

  def _infer_bucket(self, observations: list[Observation], timing: dict[str, float]
                    ) -> np.ndarray:
    """Runs at most `max_batch_size` observations; adds to `timing`."""
    start = time.perf_counter()
    bucket = batch_bucket(len(observations))
    padded = observations + [observations[-1]] * (bucket - len(observations))
    batch = self.model_batch(padded)
    seeds = np.asarray([o.seed for o in padded], np.uint32)
    preprocessed = time.perf_counter()
    compiled_before = sum(self.compile_seconds.values())
    self._sampler(bucket, batch, seeds)
    compile_s = sum(self.compile_seconds.values()) - compiled_before
    sampling = time.perf_counter()
    normalized = np.asarray(self.sample_normalized(batch, seeds))[:len(observations)]
    sampled = time.perf_counter()
    actions = self.postprocess(normalized, observations)
    done = time.perf_counter()
    timing["preprocess_ms"] += 1e3 * (preprocessed - start)
    timing["compile_ms"] += 1e3 * compile_s
    timing["model_ms"] += 1e3 * (sampled - sampling)
    timing["postprocess_ms"] += 1e3 * (done - sampled)
    return actions

  def infer(self, observation: Any) -> dict[str, Any]:
    """Actions for one observation: `actions [T, A]` float32 and `policy_timing` (ms)."""
    result = self.infer_batch([observation])
    return dict(actions=result["actions"][0], policy_timing=result["policy_timing"])

  def example_observation(self, dataset: str | None = None) -> dict[str, Any]:
    """A valid observation (grey image, zero state) of `dataset`, e.g. to compile ahead."""
    dataset = dataset or self.default_dataset or next(iter(self.datasets))
    return dict(image=np.full(tuple(self._resize_to) + (3,), 128, np.uint8),
                state=np.zeros(self.datasets[dataset].state_dim, np.float32),
                instruction="pick up the object", dataset=dataset)

  def warmup(self, batch_sizes: Sequence[int] = (1,)) -> dict[int, float]:
    """Compiles the samplers of these batch sizes' buckets; returns bucket -> compile seconds."""
    for size in batch_sizes:
      self.infer_batch([self.example_observation()] * size)
    return dict(self.compile_seconds)
