"""The retention experiment (`scripts/retention.py`, `twinbrain_jax/sim/retention.py`,
docs/retention.md): how much of a pretrained VLM's visual question answering survives VLA
training, for TwinBrain (frozen left brain), the monolithic baseline with and without
co-training, TwinBrain from scratch and Libra-VLA, all on the same robot data, steps and seed.

Use as `--config=configs/retention.py:<preset>`. Presets: `default` (the full experiment) and
`smoke` (every stage at toy scale: one demonstration and one evaluation episode per task, two
training steps, a corpus of two scenes per task; it checks the plumbing, its numbers mean
nothing). Any field can be overridden, e.g. `--config.vla_steps=1400`.
"""

import ml_collections

from twinbrain_jax.config_lib import select_preset

# name -> (config file:preset, initialised from the VLM?, evaluated one environment at a time?).
# The five VLAs, in report order. Libra's intent buffer follows one episode at a time, so
# eval_metaworld.py refuses it with --num_envs > 1.
VLAS = (
    ("twinbrain_vlm", "configs/twinbrain.py:metaworld_tiny", True, False),
    ("monolithic_vlm", "configs/twinbrain.py:metaworld_tiny_monolithic", True, False),
    ("monolithic_vlm_cotrain", "configs/twinbrain.py:metaworld_tiny_monolithic_cotrain", True,
     False),
    ("twinbrain_scratch", "configs/twinbrain.py:metaworld_tiny", False, False),
    ("libra_vlm", "configs/libra.py:metaworld_tiny", True, True),
)


def _default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # config.seed of every training run (init, data order, noise)
  # Robot data: scripted-expert demonstrations (scripts/make_metaworld_dataset.py) and the
  # tokenizer every run shares (learned for this backbone; --tokenizer_dir there).
  c.demos = ml_collections.ConfigDict(dict(
      tasks="mt10,reach-place", episodes_per_task=50, num_workers=2,
      tokenizer_config="configs/twinbrain.py:metaworld_tiny"))
  # The VQA corpus (scripts/make_vqa_dataset.py): train scenes on data seeds, held-out scenes
  # on evaluation seeds.
  c.vqa = ml_collections.ConfigDict(dict(
      tasks="mt50,reach-place", train_seeds=20, heldout_seeds=5, frames_per_seed=2))
  c.vlm = ml_collections.ConfigDict(dict(config="configs/vlm.py:metaworld_vlm", steps=2000))
  # Every VLA trains this many steps (their presets' batch 32, schedules from vla_steps).
  c.vla_steps = 3000
  c.vlas = tuple(v[0] for v in VLAS)  # which ones run, in report order
  c.vla_presets = ml_collections.ConfigDict(
      {name: dict(config=config, from_vlm=from_vlm, one_env=one_env)
       for name, config, from_vlm, one_env in VLAS})
  # Extra `--config.*` overrides of every training run (VLM and VLAs), e.g. a smaller batch.
  c.train_overrides = ()
  # Held-out VQA (scripts/eval_vqa.py, every brain of every run); limit: examples per type
  # (0: all).
  c.eval_vqa = ml_collections.ConfigDict(dict(split="heldout", limit=0))
  # Closed loop (scripts/eval_metaworld.py): one call per VLA on all `tasks`, `episodes` each on
  # the evaluation seeds; results per group (mt10, reach-place, reach-place-heldout).
  # num_envs changes the speed only (every episode keeps its seeds); Libra runs with 1.
  c.closed_loop = ml_collections.ConfigDict(dict(
      tasks="mt10,reach-place,reach-place-heldout", groups=("mt10", "reach-place",
                                                            "reach-place-heldout"),
      episodes=10, max_steps=200, num_envs=2))
  return c


def _smoke() -> ml_collections.ConfigDict:
  c = _default()
  c.demos.update(episodes_per_task=1, num_workers=0)
  c.vqa.update(tasks="reach-v3,drawer-open-v3,reach-place-left", train_seeds=1, heldout_seeds=1,
               frames_per_seed=1)
  c.vlm.steps = 2
  c.vla_steps = 2
  # Batch 8: divisible by the 8 fake CPU devices of the test run as by 1, 2 or 4 devices.
  c.train_overrides = ("--config.data.batch_size=8", "--config.train.log_every=1",
                       "--config.data.prefetch_batches=1")
  c.eval_vqa.limit = 2
  c.closed_loop.update(episodes=1, max_steps=8, num_envs=2)
  return c


PRESETS = dict(default=_default, smoke=_smoke)


def get_config(arg=None):
  return select_preset(arg, PRESETS, "configs/retention.py", default="default")
