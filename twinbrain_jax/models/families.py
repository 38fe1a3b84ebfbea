"""The model families a config can build, named by `config.family`: "twinbrain" (the default,
`configs/twinbrain.py`: TwinBrainVLA and its monolithic ablation), "libra"
(`configs/libra.py`: Libra-VLA) and "vlm" (`configs/vlm.py`: the backbone alone, trained on
question-answer data). Training, export and serving dispatch through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twinbrain_jax.config_lib import ConfigError
from twinbrain_jax.models import libra, twinbrain, vlm

FAMILIES = ("twinbrain", "libra", "vlm")
# The trainable parts of each family, each with its own learning rate (`train.optimizer.lr`).
TRAINABLE_GROUPS = dict(twinbrain=("right", "state_encoder", "action_expert"),
                        libra=("planner", "plan_head", "refiner"), vlm=("backbone",))

ModelConfig = twinbrain.TwinBrainConfig | libra.LibraConfig | vlm.VlmConfig
Model = twinbrain.TwinBrainVLA | libra.LibraVLA | vlm.VisionLanguageModel


def family(config: Mapping[str, Any]) -> str:
  """`config.family`, "twinbrain" when absent."""
  name = config.get("family", "twinbrain") or "twinbrain"
  if name not in FAMILIES:
    raise ConfigError(f"config.family={name!r}; choose one of {FAMILIES}.")
  return name


def model_config(config: Mapping[str, Any]) -> ModelConfig:
  """The model config of a whole config (its `model` block, read by its family)."""
  if family(config) == "libra":
    return libra.LibraConfig.from_config_dict(config["model"])
  if family(config) == "vlm":
    return vlm.VlmConfig.from_config_dict(config["model"])
  return twinbrain.TwinBrainConfig.from_config_dict(config["model"])


def build_model(model_config_: ModelConfig) -> Model:
  if isinstance(model_config_, libra.LibraConfig):
    return libra.LibraVLA(model_config_)
  if isinstance(model_config_, vlm.VlmConfig):
    return vlm.VisionLanguageModel(model_config_)
  return twinbrain.TwinBrainVLA(model_config_)
