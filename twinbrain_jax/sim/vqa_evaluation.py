"""Exact-match VQA accuracy of the VLM backbones inside a run, on the corpus's held-out scenes.

    brains = language_brains(bundle)             # the VLM's backbone; a VLA's left / right brain
    examples = read_examples(dataset_dir, "heldout", question_types)
    results = evaluate(brain, examples, bundle)  # per question type: correct / n, Wilson 95 %

Every brain answers alone, as a VLM, through its own language head: the tied embedding matrix
(`tie_word_embeddings`, every preset of Meta-World size, Qwen2.5-VL-3B, Qwen3-VL-4B) or the
backbone's `lm_head`. TwinBrain's right brain therefore answers without the left brain's keys
and values it reads when acting: its weights are evaluated as a VLM. A brain without a head (an
untied backbone whose `lm_head` the VLA never created) is refused (`NoLanguageHead`).

Answers: a question with a closed answer set (`choices`) is answered by likelihood: the choice
whose tokens and closing `<|im_end|>` have the highest summed log-probability. An open question
(`task`, `instruction`) is answered by greedy decoding until `<|im_end|>`; its decoded text,
stripped, must equal the answer exactly. Prompts are the training prompts
(`inputs.ModelInputs.answer_rows`); the brains run in float32 from their stored weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twinbrain_jax.answer_loss import answer_log_likelihood, answer_rows
from twinbrain_jax.data import oxe_registry, rlds, transforms
from twinbrain_jax.inputs import VlmInputs
from twinbrain_jax.models import backbones, families
from twinbrain_jax.models.layers import dequantize_kernels
from twinbrain_jax.models.qwen25vl import get_rope_index
from twinbrain_jax.models.tokenizer import IM_END, PAD, num_image_tokens
from twinbrain_jax.models.twinbrain import merged_adapter_params
from twinbrain_jax.models.vlm import VlmConfig
from twinbrain_jax.sim import vqa
from twinbrain_jax.sim.evaluation import wilson_interval

CLOSED_METHODS = ("likelihood", "greedy")


class NoLanguageHead(ValueError):
  """A brain that cannot answer: untied embeddings and no `lm_head` params."""


@dataclasses.dataclass
class Brain:
  """One backbone of a run, ready to answer.

  Attributes:
    name: "backbone" (VLM), "left" / "right" (TwinBrain), "right" (monolithic), "planner"
      (Libra).
    head: which language head answers ("tied embeddings" or "lm_head").
    params: the backbone's params in float32.
    config: its backbone config.
  """
  name: str
  head: str
  params: Any
  config: backbones.BackboneConfig


def _brain_trees(bundle: Any) -> dict[str, Any]:
  """Brain name -> its params, as stored in the bundle."""
  config, params = bundle.config, dict(bundle.params)
  name = families.family(config)
  if name == "vlm":
    return {"backbone": params["backbone"]}
  if name == "libra":
    return {"planner": params["planner"]}
  model_config = bundle.model.config
  params = merged_adapter_params(model_config, params)  # A no-op without adapters.
  trees = {}
  if "left" in params:
    left = dict(params["left"])
    left["model"] = dequantize_kernels(left["model"], jnp.float32)
    trees["left"] = left
  trees["right"] = params["right"]
  return trees


def language_brains(bundle: Any, names: Sequence[str] | None = None) -> list[Brain]:
  """The brains of a bundle (`export.Bundle`) that answer questions; `names` picks some."""
  backbone = bundle.model.config.backbone
  trees = _brain_trees(bundle)
  if names:
    unknown = sorted(set(names) - set(trees))
    if unknown:
      raise ValueError(f"The run has no brain {', '.join(unknown)}; its brains are "
                       f"{', '.join(trees)}.")
    trees = {n: trees[n] for n in names}
  brains = []
  for name, tree in trees.items():
    if backbone.text.tie_word_embeddings:
      head = "tied embeddings"
    elif "lm_head" in tree:
      head = "lm_head"
    else:
      raise NoLanguageHead(
          f"The {name} brain has no language head: its backbone does not tie its embeddings "
          "(tie_word_embeddings=False) and the run has no lm_head params (a VLA trained from "
          "random weights never creates one). Evaluate a run initialised from an HF or VLM "
          "checkpoint with a language head (init.hf_checkpoint, init.vlm_checkpoint).")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(tree))
    brains.append(Brain(name, head, params, backbone))
  return brains


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # [H, W, 3] uint8 as stored
  question: str
  answer: str
  question_type: str
  choices: tuple[str, ...]


def read_examples(dataset_dir: str, split: str = vqa.HELDOUT,
                  question_types: str | Sequence[str] | None = None,
                  limit: int | None = None) -> list[Example]:
  """The examples of one split of a `metaworld_vqa` dataset (version dir), in order, of the
  given types (`vqa.resolve_question_types`: an unknown type is an error naming the known ones);
  at most `limit` per type."""
  types = set(vqa.resolve_question_types(question_types))
  source = rlds.RldsDataset(dataset_dir, oxe_registry.get_spec("metaworld_vqa"), split)
  examples, per_type = [], {}
  for index in range(len(source)):
    episode = source.episode(index)
    for t in range(len(episode)):
      kind = episode.text(t, "question_type")
      if kind not in types or (limit is not None and per_type.get(kind, 0) >= limit):
        continue
      per_type[kind] = per_type.get(kind, 0) + 1
      choices = episode.text(t, "choices")
      examples.append(Example(episode.image(t, "image"), episode.instruction(t),
                              episode.text(t, "answer"), kind,
                              tuple(choices.split("|")) if choices else ()))
  return examples


class Answerer:
  """Answers questions with one brain: fixed shapes (`batch_size` rows of `max_lm_tokens`), so
  one compiled forward serves every batch."""

  def __init__(self, brain: Brain, tokenizer: Any, image_size: tuple[int, int],
               pad_to_multiple: int, max_lm_tokens: int, batch_size: int = 16):
    self.brain, self.batch_size = brain, int(batch_size)
    self.inputs = VlmInputs(VlmConfig(brain.config), tokenizer, 0, 0,
                            tuple(int(pad_to_multiple * -(-s // pad_to_multiple))
                                  if pad_to_multiple else int(s) for s in image_size),
                            int(max_lm_tokens))
    self._resize, self._multiple = tuple(image_size), int(pad_to_multiple)
    self._end_ids = {tokenizer.special_ids[IM_END], tokenizer.special_ids[PAD]}
    model = backbones.model_class(brain.config)(brain.config)
    grid = self.inputs.image_grid_thw(self.batch_size)

    def logits(params, rows):
      return model.apply({"params": params}, rows["lm_input_ids"], rows["lm_attention_mask"],
                         rows["pixel_values"], grid, rows["lm_position_ids"])["logits"]

    self._log_likelihood = jax.jit(lambda params, rows: answer_log_likelihood(
        logits(params, rows), rows["lm_targets"], rows["lm_loss_mask"]))
    self._next_token = jax.jit(lambda params, rows: jnp.argmax(logits(params, rows)[:, -1], -1))

  def _image(self, image: np.ndarray) -> np.ndarray:
    return transforms.pad_to_multiple(transforms.resize(image, self._resize), self._multiple)

  def _rows(self, images: Sequence[np.ndarray], questions: Sequence[str],
            answers: Sequence[str]) -> dict[str, np.ndarray]:
    """`batch_size` rows (the last repeated to fill the batch)."""
    fill = self.batch_size - len(questions)
    images = [*images] + [images[-1]] * fill
    batch = dict(image=np.stack([self._image(i) for i in images]),
                 instruction=[*questions] + [questions[-1]] * fill,
                 answer=[*answers] + [answers[-1]] * fill)
    return self.inputs(batch)

  def choose(self, examples: Sequence[Example]) -> list[str]:
    """The most likely choice of each closed question."""
    flat = [(e, c) for e in examples for c in e.choices]
    scores = []
    for start in range(0, len(flat), self.batch_size):
      chunk = flat[start:start + self.batch_size]
      rows = self._rows([e.image for e, _ in chunk], [e.question for e, _ in chunk],
                        [c for _, c in chunk])
      scores.extend(np.asarray(self._log_likelihood(self.brain.params, rows))[:len(chunk)])
    out, offset = [], 0
    for e in examples:
      out.append(e.choices[int(np.argmax(scores[offset:offset + len(e.choices)]))])
      offset += len(e.choices)
    return out

  def generate(self, examples: Sequence[Example], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers (decoded text before `<|im_end|>`, stripped). Each token is the argmax
    of a full forward of the question turn plus the tokens so far (no cache: one compiled
    shape)."""
    tok, length = self.inputs.tokenizer, self.inputs.max_lm_tokens
    grid = self.inputs.image_grid_thw(self.batch_size)
    image_tokens = num_image_tokens(grid[:1], self.brain.config.vision.spatial_merge_size)
    out = []
    for start in range(0, len(examples), self.batch_size):
      chunk = list(examples[start:start + self.batch_size])
      chunk += [chunk[-1]] * (self.batch_size - len(chunk))
      pixels = self.inputs.pixel_values(np.stack([self._image(e.image) for e in chunk]))
      questions = [tok.encode_chat(e.question, image_tokens) for e in chunk]
      generated: list[list[int]] = [[] for _ in chunk]
      done = [False] * len(chunk)
      for _ in range(max_new_tokens):
        prompts = [q + g for q, g in zip(questions, generated)]
        if max(len(p) for p in prompts) > length:
          break
        rows = answer_rows(prompts, [[]] * len(prompts), length, tok.pad_id)
        next_ids = np.asarray(self._next_token(self.brain.params, dict(
            lm_input_ids=rows["input_ids"], lm_attention_mask=rows["attention_mask"],
            lm_position_ids=get_rope_index(rows["input_ids"], grid, rows["attention_mask"],
                                           self.brain.config)[0],
            pixel_values=pixels)))
        for b, token in enumerate(next_ids.tolist()):
          if not done[b]:
            done[b] = token in self._end_ids
            if not done[b]:
              generated[b].append(token)
        if all(done):
          break
      out.extend(tok.decode(g).strip() for g in generated[:len(examples) - start])
    return out


def accuracy(outcomes: Sequence[bool]) -> dict[str, Any]:
  """`{"correct", "n", "accuracy", "ci95": [lo, hi]}` (Wilson 95 %)."""
  k, n = int(sum(outcomes)), len(outcomes)
  return dict(correct=k, n=n, accuracy=k / n if n else 0.0, ci95=list(wilson_interval(k, n)))


def evaluate(answerer: Answerer, examples: Sequence[Example], closed: str = "likelihood",
             max_new_tokens: int = 24) -> dict[str, Any]:
  """Per question type (and "all"): exact-match accuracy with its Wilson interval, and a few
  (question, answer, prediction) samples per type."""
  if closed not in CLOSED_METHODS:
    raise ValueError(f"closed={closed!r}; choose one of {CLOSED_METHODS}.")
  by_likelihood = [e for e in examples if e.choices and closed == "likelihood"]
  by_decoding = [e for e in examples if not (e.choices and closed == "likelihood")]
  predictions = dict(zip(map(id, by_likelihood), answerer.choose(by_likelihood)))
  predictions.update(zip(map(id, by_decoding), answerer.generate(by_decoding, max_new_tokens)))
  per_type: dict[str, list[bool]] = {}
  samples: dict[str, list[dict[str, str]]] = {}
  for e in examples:
    predicted = predictions[id(e)]
    per_type.setdefault(e.question_type, []).append(predicted == e.answer)
    if len(samples.setdefault(e.question_type, [])) < 3:
      samples[e.question_type].append(dict(question=e.question, answer=e.answer,
                                           predicted=predicted))
  result = {name: accuracy(outcomes) for name, outcomes in per_type.items()}
  result["all"] = accuracy([o for outcomes in per_type.values() for o in outcomes])
  return dict(per_type=result, samples=samples,
              method={name: ("likelihood" if name in {e.question_type for e in by_likelihood}
                             else "greedy") for name in per_type})


def plot_accuracy(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> None:
  """Grouped bars: per question type, one bar per brain, with the Wilson 95 % intervals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  brains = list(results)
  types = list(next(iter(results.values()))["per_type"])
  width = 0.8 / max(len(brains), 1)
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(types) * max(1, len(brains) / 2)), 3.5))
  for i, brain in enumerate(brains):
    rows = [results[brain]["per_type"][t] for t in types]
    values = np.array([r["accuracy"] for r in rows])
    errors = np.array([[v - r["ci95"][0], r["ci95"][1] - v] for v, r in zip(values, rows)]).T
    ax.bar(np.arange(len(types)) + (i - (len(brains) - 1) / 2) * width, values, width,
           yerr=errors, capsize=2, label=brain)
  ax.set_xticks(np.arange(len(types)), types, rotation=30, ha="right")
  ax.set_ylim(0, 1)
  ax.set_ylabel("exact-match accuracy")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
