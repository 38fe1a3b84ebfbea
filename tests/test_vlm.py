"""The backbone trained alone as a VLM (answer-only next-token loss), loaded into the VLAs
(`init.vlm_checkpoint`), co-training, and scripts/eval_vqa.py."""

import json
import sys

import absl.flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import processes
from fixtures_training import REPO, tiny_config
from fixtures_vqa import QUESTIONS, write_square_vqa
from twinbrain_jax.answer_loss import answer_loss, answer_rows
from twinbrain_jax.config_lib import ConfigError, preset_from_file
from twinbrain_jax.data.pipeline import DataPipeline
from twinbrain_jax.inputs import VlmInputs
from twinbrain_jax.models import backbones, families, vlm
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.tokenizer import QwenTokenizer
from twinbrain_jax.training import demo_data, export, loop, state as state_lib
from twinbrain_jax.training import step as step_lib

absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

RESERVED = (496, 497)  # The tiny preset's <|action|> / <|propri|> rows.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(root, robot config): generated bridge + fractal data, the square VQA corpus in the same
  data dir, and a synthetic tokenizer."""
  root = tmp_path_factory.mktemp("vlm")
  config = demo_data.prepare(tiny_config((8, 1, 1)), str(root), num_episodes=4,
                             num_eval_episodes=1)
  write_square_vqa(config.data.data_dir, train_scenes=16, heldout_scenes=6)
  config.train.update(num_steps=3, log_every=1, progress_bar=False)
  config.train.eval_data_dir = None
  config.checkpoint.update(every=3, keep_last=1)
  return root, config


def vlm_config(robot_config, num_steps=4):
  config = preset_from_file(REPO / "configs" / "vlm.py", "metaworld_vlm")
  config.mesh.update(data=8, fsdp=1, tensor=1)
  config.data.update(data_dir=robot_config.data.data_dir, batch_size=8, read_threads=1,
                     prefetch_batches=1)
  config.init.tokenizer = robot_config.init.tokenizer
  config.inputs.max_lm_tokens = 64
  config.train.update(num_steps=num_steps, log_every=1, progress_bar=False)
  config.checkpoint.update(every=2, keep_last=5)
  return config


@pytest.fixture(scope="module")
def vlm_run(data, tmp_path_factory):
  """Four VLM steps in one go: (config, checkpoint dir, result)."""
  _, robot = data
  config = vlm_config(robot)
  workdir = tmp_path_factory.mktemp("vlm_run")
  return config, workdir / "checkpoints", loop.train(config, str(workdir))


def _vlm_batch(tokenizer, answers=("left", "yes")):
  rng = np.random.default_rng(0)
  return dict(image=rng.integers(0, 255, (2, 112, 112, 3), np.uint8),
              instruction=np.array([QUESTIONS["left_right"][0], QUESTIONS["gripper"][0]]),
              answer=np.array(answers))


def test_answer_rows_mask_the_answer_tokens_only():
  rows = answer_rows([[7, 8, 9], [7]], [[4, 5, 2], []], length=8, pad_id=0)
  np.testing.assert_array_equal(rows["input_ids"], [[0, 0, 7, 8, 9, 4, 5, 2],
                                                    [0, 0, 0, 0, 0, 0, 0, 7]])
  np.testing.assert_array_equal(rows["attention_mask"][0], [0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows["targets"][0], [0, 7, 8, 9, 4, 5, 2, 0])
  # Position i predicts the token at i + 1: the answer 4, 5 and its closing 2 only.
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 0])
  assert rows["loss_mask"][1].sum() == 0  # No answer, no target.
  with pytest.raises(ValueError, match="max_lm_tokens=4"):
    answer_rows([[1, 2, 3]], [[4, 5]], length=4, pad_id=0)


def test_changing_a_prompt_target_changes_no_loss_and_an_answer_target_does(data):
  _, robot = data
  config = vlm_config(robot)
  model_config = families.model_config(config)
  tokenizer = QwenTokenizer.from_file(config.init.tokenizer)
  inputs = VlmInputs(model_config, tokenizer, 0, 0, (112, 112), 64)
  batch = inputs(_vlm_batch(tokenizer))
  grid = inputs.image_grid_thw(2)
  model = vlm.VisionLanguageModel(model_config)
  params = model.init(jax.random.PRNGKey(0), *vlm.init_args(model_config))["params"]
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b, grid))(params, batch)
  base, parts = answer_loss(logits, batch["lm_targets"], batch["lm_loss_mask"])
  # Answer tokens: "left" / "yes" and <|im_end|> each.
  want = [len(tokenizer.encode(a)) + 1 for a in ("left", "yes")]
  np.testing.assert_array_equal(batch["lm_loss_mask"].sum(axis=1), want)
  assert float(parts["answer_tokens"]) == sum(want)
  mask = batch["lm_loss_mask"]
  prompt = np.flatnonzero((mask[0] == 0) & (batch["lm_attention_mask"][0] == 1))
  answer = np.flatnonzero(mask[0])
  for position, changes in ((prompt[0], False), (prompt[len(prompt) // 2], False),
                            (prompt[-1], False), (answer[0], True), (answer[-1], True)):
    targets = batch["lm_targets"].copy()
    targets[0, position] = (targets[0, position] + 1) % 400
    loss = answer_loss(logits, jnp.asarray(targets), batch["lm_loss_mask"])[0]
    assert (float(loss) != float(base)) == changes, (position, changes)
  # The loss is the mean cross-entropy of the answer targets, recomputed in numpy.
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  rows, cols = np.nonzero(mask)
  reference = -np.mean(log_probs[rows, cols, batch["lm_targets"][rows, cols]])
  np.testing.assert_allclose(float(base), reference, rtol=1e-6)


def test_vlm_resume_reproduces_the_uninterrupted_losses(vlm_run, tmp_path):
  config, _, uninterrupted = vlm_run
  assert sorted(uninterrupted.losses) == [1, 2, 3, 4]
  assert set(uninterrupted.state.params) == {"backbone"} and uninterrupted.state.frozen == {}
  first = loop.train(config, str(tmp_path), stop_after=2)
  resumed = loop.train(config, str(tmp_path))
  assert first.final_step == 2 and resumed.start_step == 2 and resumed.final_step == 4
  assert {**first.losses, **resumed.losses} == uninterrupted.losses
  for got, want in zip(jax.tree.leaves(resumed.state.params),
                       jax.tree.leaves(uninterrupted.state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _backbone_leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_is_backbone(tree, backbone, dtype, reserved_rows=()):
  """`tree` holds exactly `backbone` cast to `dtype`, bit for bit (the reserved embedding rows
  excepted)."""
  got, want = _backbone_leaves(tree), _backbone_leaves(backbone)
  assert set(got) == set(want)
  for path, value in want.items():
    expected = np.asarray(jnp.asarray(value, dtype))
    if reserved_rows and path.endswith("['embed_tokens']['embedding']"):
      keep = np.setdiff1d(np.arange(value.shape[0]), reserved_rows)
      got[path], expected = got[path][keep], expected[keep]
    assert got[path].dtype == expected.dtype, path
    np.testing.assert_array_equal(got[path], expected, err_msg=path)


def test_vlm_checkpoint_gives_both_brains_its_weights_and_the_left_stays_frozen(
    data, vlm_run, tmp_path):
  _, robot = data
  _, checkpoint_dir, vlm_result = vlm_run
  backbone = jax.device_get(vlm_result.state.params["backbone"])
  config = ml_collections.ConfigDict(robot.to_dict())
  config.init.vlm_checkpoint = str(checkpoint_dir)
  config.model.left_param_dtype = "float32"  # Bit-identical brains: one storage dtype.
  workdir = tmp_path / "twinbrain"
  steps = []
  result = loop.train(config, str(workdir), on_step=steps.append)
  assert steps == [1, 2, 3]
  # After three steps the right brain moved away from the VLM; the left did not move at all.
  _assert_is_backbone(result.state.frozen["left"], backbone, jnp.float32)
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(jax.device_get(result.state.params["right"])), jax.tree.leaves(backbone))]
  assert any(moved)
  # A VLA checkpoint is no VLM checkpoint.
  with pytest.raises(ConfigError, match="is a 'twinbrain' run; it must be a VLM run"):
    state_lib.read_vlm_backbone(str(workdir / "checkpoints"),
                                families.model_config(config).backbone)
  # Before any step: both brains are the VLM's backbone (the right brain's reserved rows start
  # at the mean embedding, as from an HF checkpoint).
  fresh = ml_collections.ConfigDict(config.to_dict())
  fresh.train.num_steps = 0
  loaded = loop.train(fresh, str(tmp_path / "loaded")).state
  _assert_is_backbone(loaded.frozen["left"], backbone, jnp.float32)
  _assert_is_backbone(loaded.params["right"], backbone, jnp.float32, RESERVED)
  table = np.asarray(loaded.params["right"]["model"]["embed_tokens"]["embedding"])
  np.testing.assert_allclose(table[list(RESERVED)],
                             np.tile(np.asarray(backbone["model"]["embed_tokens"]["embedding"])
                                     [:RESERVED[0]].mean(0), (2, 1)), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_vlm_checkpoint_in_the_default_left_dtype_monolithic_and_libra(data, vlm_run, tmp_path):
  _, robot = data
  _, checkpoint_dir, vlm_result = vlm_run
  backbone = jax.device_get(vlm_result.state.params["backbone"])
  for name, edit, check in (
      ("bf16_left", lambda c: None,
       lambda s: _assert_is_backbone(s.frozen["left"], backbone, jnp.bfloat16)),
      ("monolithic", lambda c: setattr(c.model, "variant", "monolithic"),
       lambda s: (_assert_is_backbone(s.params["right"], backbone, jnp.float32, RESERVED),
                  s.frozen == {} or pytest.fail("monolithic has a frozen part"))),
  ):
    config = ml_collections.ConfigDict(robot.to_dict())
    config.init.vlm_checkpoint = str(checkpoint_dir)
    config.train.num_steps = 0
    edit(config)
    check(loop.train(config, str(tmp_path / name)).state)
  libra = preset_from_file(REPO / "configs" / "libra.py", "tiny")
  model_config = families.model_config(libra)
  from fixtures_training import Trainer, synthetic_batch  # pylint: disable=import-outside-toplevel
  libra.mesh.update(data=8, fsdp=1, tensor=1)
  trainer = Trainer(libra, synthetic_batch(tiny_config())[1])
  state = state_lib.load_pretrained_libra(trainer.init(), trainer.shardings, model_config, None,
                                          None, str(checkpoint_dir))
  _assert_is_backbone(state.params["planner"], backbone, jnp.float32)


def test_vlm_checkpoint_of_another_backbone_or_family_is_refused(data, vlm_run):
  _, checkpoint_dir, _ = vlm_run
  other = backbones.config_from_dict(backbone_preset("qwen3vl_tiny"))
  with pytest.raises(ConfigError) as error:
    state_lib.read_vlm_backbone(str(checkpoint_dir), other)
  message = str(error.value)
  assert "qwen25vl (hidden 64" in message and "qwen3vl (hidden 64" in message
  # Both shapes of the first differing param (2 decoder layers there, 3 here).
  assert ("Param model/layers/input_layernorm/scale has shape (2, 64) there but (3, 64) in this "
          "model" in message)
  wider = dict(backbone_preset("tiny").to_dict())
  wider["text"] = dict(wider["text"], vocab_size=1024)
  with pytest.raises(ConfigError, match=r"\(512, 64\) there but \(1024, 64\)"):
    state_lib.read_vlm_backbone(str(checkpoint_dir), backbones.config_from_dict(
        ml_collections.ConfigDict(wider)))


@pytest.mark.slow
def test_cotraining_adds_the_weighted_answer_loss(data, tmp_path):
  _, robot = data
  config = ml_collections.ConfigDict(robot.to_dict())
  config.model.variant = "monolithic"
  config.data.update(datasets=("bridge_dataset", "metaworld_vqa"), weights=(1.0, 1.0),
                     image_size=(112, 112))
  config.inputs.max_lm_tokens = 64
  config.train.answer_loss_weight = 0.5
  pipeline = DataPipeline(config.data)
  iterator = pipeline.iterator()
  raw = next(iterator)
  iterator.close()
  is_vqa = raw["dataset_id"] == 1
  assert is_vqa.any() and (~is_vqa).any()
  assert not raw["action_mask"][is_vqa].any()  # VQA samples add no flow target...
  assert all(raw["answer"][~is_vqa] == "")  # ...and robot samples no answer target.
  inputs = loop.model_inputs(config)
  batch = inputs(raw)
  assert (batch["lm_loss_mask"].sum(1) > 0).tolist() == is_vqa.tolist()
  model = families.build_model(inputs.config)
  grid = inputs.image_grid_thw(len(is_vqa))
  params = nn.unbox(state_lib._init_fn(model, optax.identity(), 0)().params)  # pylint: disable=protected-access
  rng = jax.random.PRNGKey(3)
  total, parts = step_lib.make_loss_fn(model, grid, 2, answer_loss_weight=0.5)(
      params, {}, batch, rng)
  flow_only, _ = step_lib.make_loss_fn(model, grid, 2)(params, {}, batch, rng)
  np.testing.assert_allclose(float(parts["loss_flow"]), float(flow_only), rtol=1e-6)
  assert float(parts["loss_answer"]) > 0
  np.testing.assert_allclose(float(total), float(flow_only) + 0.5 * float(parts["loss_answer"]),
                             rtol=1e-6)
  result = loop.train(config, str(tmp_path))  # Three co-training steps through the loop.
  assert sorted(result.losses) == [1, 2, 3] and all(np.isfinite(list(result.losses.values())))


def _eval_vqa(*args):
  return processes.run([sys.executable, str(REPO / "scripts" / "eval_vqa.py"), *args],
                       hang_timeout=900, cwd=REPO)


@pytest.mark.slow
def test_eval_vqa_on_a_vlm_run_and_a_twinbrain_bundle(data, vlm_run, tmp_path):
  _, robot = data
  _, checkpoint_dir, _ = vlm_run
  out = tmp_path / "eval"
  done = _eval_vqa(f"--run={checkpoint_dir}", f"--output_dir={out}", "--label=vlm",
                   "--batch_size=8")
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((out / "vlm.json").read_text())
  per_type = report["brains"]["backbone"]["per_type"]
  assert report["brains"]["backbone"]["head"] == "tied embeddings"
  assert {k: v["n"] for k, v in per_type.items()} == dict(left_right=6, gripper=6, all=12)
  for row in per_type.values():
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
  assert (out / "vlm_vqa.png").stat().st_size > 0
  # A TwinBrain bundle from the VLM: both brains answer, the left exactly as the VLM did.
  config = ml_collections.ConfigDict(robot.to_dict())
  config.init.vlm_checkpoint = str(checkpoint_dir)
  config.model.left_param_dtype = "float32"
  loop.train(config, str(tmp_path / "vla"))
  export.export_checkpoint(tmp_path / "vla" / "checkpoints", tmp_path / "bundle", "float32")
  done = _eval_vqa(f"--run={tmp_path / 'bundle'}", f"--output_dir={out}", "--label=twinbrain",
                   "--batch_size=8", f"--data_dir={robot.data.data_dir}")
  assert done.returncode == 0, done.stderr[-3000:]
  brains = json.loads((out / "twinbrain.json").read_text())["brains"]
  assert set(brains) == {"left", "right"}
  assert brains["left"]["per_type"] == per_type


@pytest.mark.slow
def test_eval_vqa_bad_input(data, vlm_run, tmp_path):
  _, robot = data
  _, checkpoint_dir, _ = vlm_run
  done = _eval_vqa(f"--run={checkpoint_dir}", "--question_types=left_rigth")
  assert done.returncode == 1 and "did you mean left_right" in done.stderr
  # A TwinBrain bundle whose backbone has untied embeddings and no lm_head params.
  config = ml_collections.ConfigDict(robot.to_dict())
  config.model.backbone.text.tie_word_embeddings = False
  model = families.build_model(families.model_config(config))
  params = nn.unbox(state_lib._init_fn(model, optax.identity(), 0)()).all_params()  # pylint: disable=protected-access
  assert "lm_head" not in params["right"]
  export.export_bundle(params, json.loads(json.dumps(config.to_dict())), {},
                       config.init.tokenizer, tmp_path / "bundle", "float32")
  done = _eval_vqa(f"--run={tmp_path / 'bundle'}", f"--data_dir={robot.data.data_dir}")
  assert done.returncode == 1 and "has no language head" in done.stderr, done.stderr[-2000:]


def test_vlm_steps_vla_steps_eval_vqa_and_one_closed_loop_episode(tmp_path):
  """The whole path on Meta-World, tiny: VQA corpus and demonstrations of reach-v3 -> VLM steps
  -> TwinBrain steps from the VLM -> eval_vqa.py on both brains -> one closed-loop episode."""
  from twinbrain_jax.sim import metaworld_dataset as mwd  # pylint: disable=import-outside-toplevel
  from twinbrain_jax.sim import vqa_dataset as vd  # pylint: disable=import-outside-toplevel
  data_dir, tokenizer = tmp_path / "data", tmp_path / "tokenizer"
  mwd.write_dataset(str(data_dir), "reach-v3", episodes_per_task=2)
  report = vd.write_dataset(str(data_dir), "reach-v3", train_seeds=1, heldout_seeds=1,
                            frames_per_seed=1)
  vla = preset_from_file(REPO / "configs" / "twinbrain.py", "metaworld_tiny")
  mwd.write_tokenizer(str(tokenizer), vla.model)
  vlm_cfg = preset_from_file(REPO / "configs" / "vlm.py", "metaworld_vlm")
  for config, steps in ((vlm_cfg, 2), (vla, 2)):
    config.data.update(data_dir=str(data_dir), batch_size=8, read_threads=1, prefetch_batches=1)
    config.init.tokenizer = str(tokenizer)
    config.train.update(num_steps=steps, log_every=1, progress_bar=False)
    config.checkpoint.update(every=steps, async_save=False)
  loop.train(vlm_cfg, str(tmp_path / "vlm"))
  vla.init.vlm_checkpoint = str(tmp_path / "vlm" / "checkpoints")
  result = loop.train(vla, str(tmp_path / "vla"))
  assert result.final_step == 2
  checkpoints = tmp_path / "vla" / "checkpoints"
  done = _eval_vqa(f"--run={checkpoints}", f"--output_dir={tmp_path}", "--label=vla",
                   "--batch_size=8", "--max_lm_tokens=128")
  assert done.returncode == 0, done.stderr[-3000:]
  brains = json.loads((tmp_path / "vla.json").read_text())["brains"]
  assert set(brains) == {"left", "right"}
  for brain in brains.values():
    assert brain["per_type"]["all"]["n"] == report["examples"]["heldout"]
  episode = processes.run([sys.executable, "scripts/eval_metaworld.py", f"--policy={checkpoints}",
                           "--tasks=reach-v3", "--episodes=1", "--max_steps=20",
                           "--num_videos=0", f"--output_dir={tmp_path}", "--label=episode"],
                          tmp_path / "episode", 900, cwd=REPO)
  assert episode.returncode == 0, episode.stderr[-3000:]
  outcome = json.loads((tmp_path / "episode.json").read_text())
  assert outcome["tasks"]["reach-v3"]["episodes"] == 1


@pytest.mark.parametrize("preset,twin", [("metaworld_vlm", "metaworld_tiny"),
                                         ("metaworld_vlm_qwen3vl", "metaworld_tiny_qwen3vl")])
def test_vlm_presets_have_the_backbone_of_their_vla_preset(preset, twin):
  config = preset_from_file(REPO / "configs" / "vlm.py", preset)
  vla = preset_from_file(REPO / "configs" / "twinbrain.py", twin)
  model_config = families.model_config(config)
  assert families.family(config) == "vlm" and config.data.datasets == ("metaworld_vqa",)
  assert model_config.backbone == families.model_config(vla).backbone
  model = families.build_model(model_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             *vlm.init_args(model_config))["params"])
  want = state_lib.backbone_param_shapes(model_config.backbone)
  got = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in
         jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["backbone"]))[0]}
  assert got == want
