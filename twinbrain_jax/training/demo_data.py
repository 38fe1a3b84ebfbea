"""Generated data and a synthetic tokenizer for runs that download nothing (demo, tests)."""

from __future__ import annotations

import os

import ml_collections

from twinbrain_jax.data import generate
from twinbrain_jax.models import backbones
from twinbrain_jax.models.tokenizer import write_synthetic_tokenizer

_SCHEMAS = {"bridge_dataset": generate.BRIDGE, "bridge_orig": generate.BRIDGE,
            "fractal20220817_data": generate.FRACTAL}
# The generated datasets' instructions come from the same small vocabulary of robot tasks.
CORPUS = ["pick up the coke can", "put the carrot on the plate", "open the top drawer",
          "move the sponge to the left of the blue cloth", "place the spoon in the towel",
          "close the middle drawer", "put eggplant into yellow basket", "stack the green block",
          "Instruction: \nAction Query: ", "user\n", "assistant\n", "\n"] * 10


def write_tokenizer(directory: str, model_config: ml_collections.ConfigDict,
                    corpus: list[str]) -> None:
  """A synthetic BPE tokenizer for `model_config`'s backbone (its special-token ids, the right
  brain's `<|action|>`/`<|propri|>` rows reserved), learned from `corpus`, in `directory`."""
  backbone = backbones.config_from_dict(model_config.backbone)
  write_synthetic_tokenizer(directory, backbone, corpus,
                            reserved_ids=(model_config.action_token_id,
                                          model_config.propri_token_id))


def prepare(config: ml_collections.ConfigDict, workdir: str, *, num_episodes: int = 12,
            num_eval_episodes: int = 4) -> ml_collections.ConfigDict:
  """Writes train and held-out datasets plus a tokenizer under `workdir`; returns `config`
  pointing at them (data.data_dir, train.eval_data_dir, init.tokenizer)."""
  config = ml_collections.ConfigDict(config.to_dict())
  train_dir, eval_dir = os.path.join(workdir, "data", "train"), os.path.join(workdir, "data", "eval")
  for i, name in enumerate(config.data.datasets):
    if name not in _SCHEMAS:
      raise ValueError(f"No generator for dataset {name!r}; generated data exists for "
                       f"{sorted(_SCHEMAS)}.")
    for directory, episodes, seed in ((train_dir, num_episodes, 10 + i),
                                      (eval_dir, num_eval_episodes, 100 + i)):
      if not os.path.isdir(os.path.join(directory, name)):
        generate.generate_dataset(_SCHEMAS[name], directory, num_episodes=episodes, seed=seed)
  tokenizer = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
    write_tokenizer(tokenizer, config.model, CORPUS)
  config.data.data_dir = train_dir
  config.train.eval_data_dir = eval_dir
  config.init.tokenizer = tokenizer
  return config
