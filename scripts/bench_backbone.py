"""Forward latency of the Flax backbone vs the HF PyTorch reference at a `small` size (CPU).

  python scripts/bench_backbone.py [--preset=small|qwen3vl_small] [--batch_sizes=1,4] [--runs=20]

`--preset` picks the family: `small` is Qwen2.5-VL, `qwen3vl_small` Qwen3-VL (with DeepStack),
against `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration`.

Both models hold the same random weights (the PyTorch model is saved with `save_pretrained` and
loaded by `hf_loading`); inputs are one 224x224 image per sample (64 merged image tokens for
Qwen2.5-VL's patch 14, 49 for Qwen3-VL's patch 16) in the Qwen chat template around a 12-word
instruction. Per batch size it prints the median (and min) of `runs` timed forwards, the two
models alternating in blocks of 5 (each block after `warmup` untimed forwards) so that both see
the same background load, the Flax compile time (reported apart), the ratio, and the max
|logit difference| as a sanity check; `--docs=docs/benchmarks.md` also writes the table
there (one section per preset, replacing that preset's previous one).

The Flax time covers the host-side `get_rope_index` and the jitted forward until the logits are
ready; the PyTorch time covers `model(...)` under `torch.no_grad()` (which computes the rope
index inside). Pixel preprocessing is excluded from both.
"""

import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import flags

from twinbrain_jax import cli
from twinbrain_jax.models import backbones, hf_loading, qwen25vl
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.image_processor import preprocess_images, processor_settings

_PRESET = flags.DEFINE_string("preset", "small", "Backbone preset (small: Qwen2.5-VL, "
                              "qwen3vl_small: Qwen3-VL).")
# Family -> the transformers (config, model) class names of the reference.
_HF_CLASSES = dict(qwen25vl=("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                   qwen3vl=("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"))
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes to time.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed forwards per setting (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed forwards before each block of 5 timed ones.")
_DOCS = flags.DEFINE_string("docs", "", "Markdown file whose section for this preset the table "
                            "replaces, e.g. docs/benchmarks.md ('' = print only).")

_INSTRUCTION_WORDS = 12
# Template tokens around the instruction: <|im_start|> user \n <|vision_start|> ...
# <|vision_end|> ... <|im_end|> \n <|im_start|> assistant \n.
_TEMPLATE_TOKENS = 9


def _inputs(config, batch_size, rng):
  """Left-aligned prompts (no padding needed: all samples have the same length)."""
  images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch_size)]
  settings = dict(processor_settings(config.family), min_pixels=224 * 224,
                  max_pixels=224 * 224)
  pixel_values, grid = preprocess_images(images, **settings)
  num_image = int(np.prod(grid[0])) // config.vision.spatial_merge_size ** 2
  # One token per word plus a few sub-word pieces, as a BPE would give for a short instruction.
  num_text = _INSTRUCTION_WORDS + 4
  vocab = config.text.vocab_size - 16  # The top ids hold the special tokens.
  rows = []
  for _ in range(batch_size):
    template = rng.integers(0, vocab, _TEMPLATE_TOKENS - 2).tolist()
    rows.append(template[:3] + [config.vision_start_token_id] + [config.image_token_id] * num_image
                + [config.vision_end_token_id] + rng.integers(0, vocab, num_text).tolist()
                + template[3:])
  ids = np.asarray(rows, np.int64)
  return ids, np.ones_like(ids), pixel_values, grid, num_image


def _write_docs(path, header, rows, context, preset):
  # The Qwen2.5-VL `small` section keeps its original markers.
  tag = "bench_backbone" if preset == "small" else f"bench_backbone_{preset}"
  marker_start, marker_end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
  title = "## Backbone forward latency (`scripts/bench_backbone.py`)"
  if preset != "small":
    title = f"## Backbone forward latency, `{preset}` (`scripts/bench_backbone.py --preset={preset}`)"
  section = "\n".join([
      marker_start, title, "", context, "",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
      *("| " + " | ".join(r) + " |" for r in rows), marker_end])
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if marker_start in text:
    before, rest = text.split(marker_start, 1)
    text = before + section + rest.split(marker_end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def main(argv):
  del argv
  import torch  # The reference; a test-only dependency.
  import transformers

  config = backbones.config_from_dict(backbone_preset(_PRESET.value))
  config_class, model_class = (getattr(transformers, name) for name in _HF_CLASSES[config.family])
  torch.manual_seed(0)
  hf_model = model_class(config_class(**hf_loading.hf_config_kwargs(config))).float().eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    model, params = hf_loading.load_pretrained(tmp)

  rng = np.random.default_rng(0)
  header = ["batch", "tokens", "Flax ms", "PyTorch ms", "PyTorch / Flax", "Flax min ms",
            "PyTorch min ms", "Flax compile s", "max logit diff"]
  rows = []
  load_before = os.getloadavg()[0]
  print(f"preset {_PRESET.value} ({config.family}), CPU ({os.cpu_count()} cores, load {load_before:.1f}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(" ".join(header))
  for batch_size in map(int, _BATCH_SIZES.value):
    ids, mask, pixel_values, grid, num_image = _inputs(config, batch_size, rng)
    apply = jax.jit(
        lambda p, i, m, x, pos: model.apply({"params": p}, i, m, x, grid, pos)["logits"])

    start = time.perf_counter()
    positions, _ = qwen25vl.get_rope_index(ids, grid, mask, config)
    compiled = apply.lower(params, ids, mask, pixel_values, positions).compile()
    compile_seconds = time.perf_counter() - start

    def flax_forward():
      positions, _ = qwen25vl.get_rope_index(ids, grid, mask, config)
      return compiled(params, ids, mask, pixel_values, positions).block_until_ready()

    torch_inputs = dict(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
        mm_token_type_ids=torch.tensor((ids == config.image_token_id).astype(np.int64)))

    def torch_forward():
      with torch.no_grad():
        return hf_model(**torch_inputs).logits

    flax_logits = np.asarray(flax_forward())
    error = float(np.abs(flax_logits - torch_forward().numpy()).max())
    (flax_s, flax_min), (torch_s, torch_min) = cli.interleaved_seconds(
        [flax_forward, torch_forward], _RUNS.value, _WARMUP.value, block=5)
    row = [str(batch_size), str(ids.shape[1]), f"{flax_s * 1e3:.1f}", f"{torch_s * 1e3:.1f}",
           f"{torch_s / flax_s:.2f}", f"{flax_min * 1e3:.1f}", f"{torch_min * 1e3:.1f}",
           f"{compile_seconds:.2f}", f"{error:.1e}"]
    rows.append(row)
    print(" ".join(f"{v:>{len(h)}s}" for v, h in zip(row, header)))

  if _DOCS.value:
    t, v = config.text, config.vision
    deepstack = (f", DeepStack after {len(v.deepstack_visual_indexes)} decoder layers"
                 if config.family == "qwen3vl" else "")
    context = (
        f"Preset `{_PRESET.value}` ({config.family}: text {t.hidden_size} x "
        f"{t.num_hidden_layers} layers, vision {v.hidden_size} x {v.depth} blocks{deepstack}), "
        "fp32, CPU "
        f"({os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, jax {jax.__version__}). One 224x224 image per sample ({num_image} merged "
        f"image tokens) and a {_INSTRUCTION_WORDS}-word instruction in the chat template. "
        f"Median (and min) of {_RUNS.value} forwards, the two models alternating in blocks of 5, "
        f"each after {_WARMUP.value} untimed ones; Flax compile time measured apart (lower + "
        "compile). "
        "Ratio of medians; > 1: Flax is faster. 1-minute load "
        f"average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after the run (a load "
        "above the core count means other processes shared the CPU and the times are noisy).")
    _write_docs(_DOCS.value, header, rows, context, _PRESET.value)
    print(f"wrote {_DOCS.value}")


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)
