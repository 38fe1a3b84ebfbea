"""The backbone families and how a config picks one.

`config.model.backbone.family` (a `backbone_presets` block) or a checkpoint's `config.json`
`model_type` says which family builds the model:

    family      model_type    config            model     vision converter
    qwen25vl    qwen2_5_vl    Qwen25VLConfig    Qwen25VL  qwen25vl_vision.vision_params_from_hf
    qwen3vl     qwen3_vl      Qwen3VLConfig     Qwen3VL   qwen3vl_vision.vision_params_from_hf

Both models have the same interface (`embed_multimodal`, `model.rotary`, `model.run_layers`,
the decoder layer's `qkv`/`out` halves reached through `model.layer()` +
`model.stacked_layer_params()` when scanned or `model.layers` when unrolled, `logits`), so
TwinBrain, the data pipeline and the loaders are family-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from twinbrain_jax.models import qwen3vl, qwen3vl_vision, qwen25vl, qwen25vl_vision


class Family(NamedTuple):
  """What one backbone family is made of."""
  model_type: str
  config_cls: type
  model_cls: type
  vision_params_from_hf: Callable[..., dict]


FAMILIES = {
    "qwen25vl": Family("qwen2_5_vl", qwen25vl.Qwen25VLConfig, qwen25vl.Qwen25VL,
                       qwen25vl_vision.vision_params_from_hf),
    "qwen3vl": Family("qwen3_vl", qwen3vl.Qwen3VLConfig, qwen3vl.Qwen3VL,
                      qwen3vl_vision.vision_params_from_hf),
}
DEFAULT_FAMILY = "qwen25vl"

BackboneConfig = qwen25vl.Qwen25VLConfig | qwen3vl.Qwen3VLConfig


def family(name: str) -> Family:
  """The `Family` called `name`; the error lists the known ones."""
  if name not in FAMILIES:
    raise ValueError(f"Unknown backbone family {name!r}; choose one of {sorted(FAMILIES)} "
                     "(config.model.backbone.family).")
  return FAMILIES[name]


def config_from_dict(cd: Mapping[str, Any]) -> BackboneConfig:
  """`config.model.backbone` -> the config of its family (`family`, default qwen25vl)."""
  name = cd.get("family", DEFAULT_FAMILY) if hasattr(cd, "get") else DEFAULT_FAMILY
  return family(name).config_cls.from_config_dict(cd)


def config_from_hf(d: Mapping[str, Any]) -> BackboneConfig:
  """A parsed HF `config.json` -> the config of the family its `model_type` names (files
  without one are read as Qwen2.5-VL)."""
  model_type = d.get("model_type", FAMILIES[DEFAULT_FAMILY].model_type)
  for f in FAMILIES.values():
    if f.model_type == model_type:
      return f.config_cls.from_hf(d)
  raise ValueError(f"config.json has model_type={model_type!r}; the supported checkpoints are "
                   f"{sorted(f.model_type for f in FAMILIES.values())}.")


def model_class(config: BackboneConfig) -> type:
  """`Qwen25VL` or `Qwen3VL`, the module that `config` builds."""
  return family(config.family).model_cls

