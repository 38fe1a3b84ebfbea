"""Exact-match VQA accuracy per question type of the backbones inside a run, on held-out scenes.

  python scripts/eval_vqa.py --run=<runs_dir>/vlm/checkpoints --data_dir=<data_dir> \
      --output_dir=<eval_dir>
  python scripts/eval_vqa.py --run=<bundle or VLA checkpoint dir> --brains=left,right ...

--run is a VLM run (`configs/vlm.py`: its backbone), or a VLA bundle or checkpoint dir: the
monolithic baseline's backbone (`right`), TwinBrain's `left` and `right` brains, Libra's
`planner`. Each brain answers alone through its own language head (the tied embedding matrix, or
`lm_head`; a brain without one is an error). Closed questions (those with `choices`) are answered
by likelihood over the choices (--closed=greedy decodes them instead); open ones (`task`,
`instruction`) by greedy decoding, compared exactly with the answer
(twinbrain_jax/sim/vqa_evaluation.py). Reads `<data_dir>/metaworld_vqa` (newest version),
split --split; writes `<output_dir>/<label>.json` and `<label>_vqa.png` and prints a table with
95 % Wilson intervals.
"""

import json
import os
import sys
import time

from absl import flags

from twinbrain_jax import cli

_RUN = flags.DEFINE_string("run", None, "A VLM or VLA checkpoint dir, or a bundle.", required=True)
_STEP = flags.DEFINE_integer("step", None, "With a checkpoint dir: the step; default the latest.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "With a checkpoint dir: default the "
                                 "run's init.tokenizer.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Holds metaworld_vqa/; default the run's "
                                "data.data_dir.")
_SPLIT = flags.DEFINE_string("split", "heldout", "Split of the corpus (heldout: evaluation seeds).")
_TYPES = flags.DEFINE_string("question_types", "all", "Question types, comma-separated, or all.")
_BRAINS = flags.DEFINE_list("brains", None, "Brains to evaluate; default all of the run's.")
_CLOSED = flags.DEFINE_enum("closed", "likelihood", ["likelihood", "greedy"],
                            "How questions with a closed answer set are answered.")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many examples per question type.")
_MAX_LM_TOKENS = flags.DEFINE_integer("max_lm_tokens", None, "Question-answer row length; "
                                      "default the run's inputs.max_lm_tokens, else 128.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per forward.")
_LABEL = flags.DEFINE_string("label", None, "Name in the results; default the run dir's name.")
_OUTPUT = flags.DEFINE_string("output_dir", "eval_vqa", "Where the JSON and PNG go.")


def main(argv):
  del argv
  from twinbrain_jax.data import rlds
  from twinbrain_jax.sim import vqa, vqa_evaluation
  from twinbrain_jax.training import export

  try:
    types = vqa.resolve_question_types(_TYPES.value)
  except ValueError as e:
    sys.exit(f"error: --question_types: {e}")
  try:
    bundle = export.load_bundle_or_checkpoint(_RUN.value, _STEP.value, _TOKENIZER.value,
                                              "float32")
    brains = vqa_evaluation.language_brains(bundle, _BRAINS.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  data_dir = _DATA_DIR.value or bundle.config.data.get("data_dir")
  if not data_dir:
    sys.exit("error: pass --data_dir (the directory holding metaworld_vqa/).")
  try:
    dataset_dir = rlds.resolve_dataset_dir(data_dir, "metaworld_vqa")
    examples = vqa_evaluation.read_examples(dataset_dir, _SPLIT.value, types, _LIMIT.value)
  except (FileNotFoundError, rlds.DataError) as e:
    sys.exit(f"error: {e}")
  if not examples:
    sys.exit(f"error: {dataset_dir} has no {_SPLIT.value} example of types {', '.join(types)}.")
  length = (_MAX_LM_TOKENS.value or bundle.config.inputs.get("max_lm_tokens", 0) or 128)
  label = _LABEL.value or os.path.basename(os.path.normpath(_RUN.value))
  results = {}
  for brain in brains:
    start = time.perf_counter()
    answerer = vqa_evaluation.Answerer(brain, bundle.tokenizer, tuple(bundle.config.data.image_size),
                                       int(bundle.config.data.pad_to_multiple), length,
                                       _BATCH.value)
    results[brain.name] = dict(head=brain.head, **vqa_evaluation.evaluate(
        answerer, examples, _CLOSED.value), seconds=time.perf_counter() - start)
  os.makedirs(_OUTPUT.value, exist_ok=True)
  report = dict(label=label, run=os.path.abspath(_RUN.value), dataset=dataset_dir,
                split=_SPLIT.value, closed=_CLOSED.value, max_lm_tokens=length,
                family=bundle.config.get("family", "twinbrain"), brains=results)
  path = os.path.join(_OUTPUT.value, f"{label}.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  vqa_evaluation.plot_accuracy(results, os.path.join(_OUTPUT.value, f"{label}_vqa.png"), label)
  print(f"| brain (head) | type | correct / n | accuracy | 95 % interval |\n|---|---|---|---|---|")
  for name, result in results.items():
    for kind, row in result["per_type"].items():
      print(f"| {name} ({result['head']}) | {kind} | {row['correct']} / {row['n']} | "
            f"{row['accuracy']:.3f} | [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] |")
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
