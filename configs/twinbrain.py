"""TwinBrainVLA configs. Use as `--config=configs/twinbrain.py:<preset>`.

Presets: `tiny` (tests, demo), `small` (benchmarks), `qwen25vl_3b`, `qwen25vl_7b`, the Qwen3-VL
backbone (`model.backbone.family="qwen3vl"`, DeepStack in both brains) as `qwen3vl_tiny`
(tests) and `qwen3vl_4b` (the paper's best TwinBrainVLA, Qwen3-VL-4B-Instruct), and the
Meta-World MT10 closed-loop runs (docs/metaworld.md), CPU-trainable: `metaworld_tiny`
(TwinBrain), `metaworld_tiny_monolithic` (one VLM, no left brain) and `metaworld_tiny_blind`
(TwinBrain trained and evaluated with every instruction replaced by ""),
`metaworld_tiny_qwen3vl` (`metaworld_tiny` on the `qwen3vl_tiny` backbone) and
`metaworld_tiny_monolithic_cotrain` (the monolithic baseline co-trained on Meta-World VQA:
`data.weights` sets the share of VQA samples, `train.answer_loss_weight` the weight of the
answer-only next-token loss; docs/vqa.md). `<preset>_lora`
(`qwen25vl_3b_lora`, `qwen25vl_7b_lora`, `qwen3vl_4b_lora`, `metaworld_tiny_lora`) trains the
right brain through low-rank adapters (`model.lora`) instead of fully.
Any field can be overridden on the command line, e.g. `--config.mesh.fsdp=4`.
"""

import ml_collections
from ml_collections import config_dict

from twinbrain_jax.config_lib import select_preset
from twinbrain_jax.data.config import default_data_config
from twinbrain_jax.models.backbone_presets import backbone_preset

# Logical axis name -> mesh axes. Ordered: the first rule whose mesh axes are still free wins,
# so activations `[batch, length, embed]` put batch on (data, fsdp) and leave embed whole.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("patch", None),
    ("layers", None),
    ("action", None),
    ("state", None),
    ("embodiment", None),
)

# `<|action|>` / `<|propri|>` ids of the right tokenizer: unused rows of each embedding table.
# Qwen3-VL's tokenizer uses ids up to 151668 (<think>, </think>).
_SPECIAL_TOKEN_IDS = dict(tiny=(496, 497), small=(4086, 4087), qwen3vl_tiny=(496, 497),
                          qwen3vl_4b=(151669, 151670),
                          **{"3b": (151665, 151666), "7b": (151665, 151666)})


def _base(backbone: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Device mesh: sizes of the named axes; -1 takes all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  # Multi-process start-up. Leave unset to auto-detect TPU pods / SLURM / Open MPI.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
      auto=False))
  c.model = ml_collections.ConfigDict()
  c.model.backbone = backbone_preset(backbone)
  c.data = default_data_config()
  c.data.state_dim = 8  # bridge 7 / fractal 8, zero-padded to the model's state width
  vision = c.model.backbone.vision
  c.data.pad_to_multiple = vision.patch_size * vision.spatial_merge_size  # 28, or 32 (Qwen3-VL)
  # Pipeline batch -> model batch (twinbrain_jax/inputs.py): fixed, left-padded prompt lengths.
  # max_lm_tokens: question-answer rows (prompt + answer) for co-training; 0 = none.
  c.inputs = ml_collections.ConfigDict(dict(max_left_tokens=128, max_right_tokens=160,
                                            max_lm_tokens=0))
  m = c.model
  m.variant = "twinbrain"  # or "monolithic": one trainable VLM, no left brain (Qwen-GR00T)
  m.mask_mode = "all_left"  # or "index_causal" (public-code alignment), "full_joint" (ablation)
  m.num_action_queries = 8
  m.action_token_id, m.propri_token_id = _SPECIAL_TOKEN_IDS[backbone]
  m.conditioning = "action_queries"  # or "all_right"
  m.state_dim = 8
  m.state_hidden_dim = 1024
  m.num_embodiments = 1
  m.dtype = "float32"  # compute dtype
  m.param_dtype = "float32"  # trainable parts
  m.left_param_dtype = "bfloat16"  # frozen left brain storage
  m.left_dtype = "bfloat16"  # frozen left brain compute
  m.left_quantization = "none"  # or "int8": weight-only decoder kernels, per-channel scales
  # Low-rank adapters on the right brain's decoder projections (rank 0: full fine-tuning). With
  # rank > 0 the right brain's base weights are frozen (stored in base_param_dtype); the
  # adapters, the state encoder and the action expert train (docs/training.md).
  m.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, base_param_dtype="bfloat16",
      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
  # Per right-brain layer, vision block and DiT block (`action_expert.remat_policy` overrides it
  # for the DiT): "dots" keeps matmul outputs and recomputes the rest in the backward pass; on
  # CPU it is also the fastest (docs/benchmarks.md). "none", "full".
  m.remat_policy = "dots"
  # Layers as one `nn.scan` (params stacked on a `layers` axis): compiles one layer, not all.
  # False unrolls them (`layers_{i}` params), e.g. to inspect one layer while debugging.
  m.scan_layers = True
  m.action_expert = ml_collections.ConfigDict(dict(
      num_layers=16, num_heads=12, head_dim=64, action_dim=7, action_horizon=16, state_dim=8,
      num_future_tokens=32, hidden_dim=1024, dropout=0.2))
  # Flow matching: R noise draws per VLM forward; the ODE sampler.
  c.flow = ml_collections.ConfigDict(dict(num_repeats=4, num_steps=4, method="euler"))
  # Executing chunks on the robot (twinbrain_jax/serving/execution.py; served as metadata): a new
  # chunk every replan_steps, CogACT adaptive ensembling (horizon 7, alpha 0.1 on WidowX).
  c.execution = ml_collections.ConfigDict(dict(
      replan_steps=1, ensemble="adaptive", horizon=7, temporal_k=0.01, adaptive_alpha=0.1))
  # Initial weights: left and right brains from one HF Qwen2.5-VL / Qwen3-VL dir, or from the
  # backbone of a VLM run's checkpoint dir (configs/vlm.py; None = random init); the tokenizer
  # dir defaults to the HF checkpoint's.
  c.init = ml_collections.ConfigDict(dict(
      hf_checkpoint=config_dict.placeholder(str), vlm_checkpoint=config_dict.placeholder(str),
      tokenizer=config_dict.placeholder(str)))
  # Training (twinbrain_jax/training): the starVLA OXE recipe. Paths are relative to --workdir.
  c.train = ml_collections.ConfigDict(dict(
      num_steps=40_000, grad_accum_steps=1, log_every=50, eval_every=1000, eval_batches=8,
      # Held-out data for validation: a TFDS dir with the same datasets (None = no validation).
      eval_data_dir=config_dict.placeholder(str), eval_split="train",
      # Dense bf16 peak of one H100 SXM, for MFU.
      peak_flops_per_device=989e12, progress_bar=True,
      tensorboard_dir="tensorboard",
      # Co-training: weight of the right brain's answer-only next-token loss on the batch's
      # question-answer samples, added to the flow-matching loss (0 = none).
      answer_loss_weight=0.0))
  c.train.optimizer = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-8, clip_norm=1.0, warmup_steps=5000,
      min_lr=5e-7, lr=ml_collections.ConfigDict(dict(
          right=1e-5, state_encoder=1e-4, action_expert=1e-4))))
  # Orbax checkpoints: async, the last `keep_last` plus every `keep_every`-th step.
  c.checkpoint = ml_collections.ConfigDict(dict(
      dir="checkpoints", every=1000, keep_last=3, keep_every=config_dict.placeholder(int),
      async_save=True))
  return c


def _tiny(backbone: str = "tiny"):
  c = _base(backbone)
  # 16 merged image tokens keep the demo fast (patch 14 or 16, merge 2).
  c.data.image_size = (128, 128) if backbone == "qwen3vl_tiny" else (112, 112)
  c.inputs.update(max_left_tokens=96, max_right_tokens=128)
  c.model.state_hidden_dim = 32
  c.model.action_expert.update(num_layers=2, num_heads=2, head_dim=16, num_future_tokens=4,
                               hidden_dim=32, dropout=0.0)
  c.flow.num_repeats = 2
  c.data.update(batch_size=8, read_threads=2, prefetch_batches=2)
  c.train.update(num_steps=40, log_every=5, eval_every=20, eval_batches=2,
                 peak_flops_per_device=1e11)  # ~ one CPU core's fp32 peak
  c.train.optimizer.update(warmup_steps=5, lr=dict(right=1e-3, state_encoder=1e-3,
                                                   action_expert=1e-3))
  c.checkpoint.update(every=10, keep_last=2, keep_every=20)
  return c


def _metaworld_tiny(backbone: str = "tiny"):
  """The `tiny` backbone on Meta-World MT10 (`scripts/make_metaworld_dataset.py`): 112 px frames,
  4-D state and action, chunks of 8 steps, executed 4 at a time (a new chunk every 4 steps)."""
  c = _tiny(backbone)
  c.data.update(datasets=("metaworld",), weights=(1.0,), state_dim=4, action_dim=4,
                action_horizon=8, batch_size=32, read_threads=2, prefetch_batches=4)
  c.data.augment.update(crop_scale=(0.95, 1.0), hue=0.0)  # Fixed camera: mild augmentation.
  c.inputs.update(max_left_tokens=64, max_right_tokens=96)
  c.model.state_dim = 4
  c.model.state_hidden_dim = 128
  c.model.action_expert.update(num_layers=4, num_heads=4, head_dim=32, num_future_tokens=4,
                               hidden_dim=128, action_dim=4, action_horizon=8, state_dim=4,
                               dropout=0.0)
  c.flow.update(num_repeats=4, num_steps=8)
  c.execution.update(replan_steps=4, ensemble="none", horizon=8)
  c.train.update(num_steps=3000, log_every=50, eval_every=1000, progress_bar=False)
  c.train.optimizer.update(warmup_steps=200, min_lr=1e-5, lr=dict(
      right=1e-3, state_encoder=1e-3, action_expert=1e-3))
  c.checkpoint.update(every=250, keep_last=2)
  c.checkpoint.keep_every = None
  return c


def _metaworld_demo():
  """`metaworld_tiny` trained briefly, for `make demo` (a few tasks, ~4 minutes on 2 cores)."""
  c = _metaworld_tiny()
  c.train.update(num_steps=600, log_every=100, progress_bar=True)
  c.train.optimizer.warmup_steps = 100
  c.checkpoint.update(every=300, keep_last=1)
  return c


def _metaworld_tiny_monolithic():
  c = _metaworld_tiny()
  c.model.variant = "monolithic"
  return c


def _metaworld_tiny_monolithic_cotrain():
  """`metaworld_tiny_monolithic` whose batches mix Meta-World VQA samples in (one in five) and
  add the right brain's answer-only next-token loss (weight 1) to the flow-matching loss."""
  c = _metaworld_tiny_monolithic()
  c.data.update(datasets=("metaworld", "metaworld_vqa"), weights=(1.0, 0.25))
  # A question is also the instruction of its sample's (action-less) VLA prompts: room for the
  # longest (the corpus's question-answer rows reach 93 tokens with the Meta-World tokenizer).
  c.inputs.update(max_left_tokens=96, max_right_tokens=128, max_lm_tokens=128)
  c.train.answer_loss_weight = 1.0
  return c


def _metaworld_tiny_blind():
  c = _metaworld_tiny()
  c.data.drop_instruction = True
  return c


def _metaworld_mt50():
  """`metaworld_tiny` on MT50 (`make_metaworld_dataset.py --tasks=mt50`, 50 demonstrations per
  task): 8 000 steps, checkpoints kept every 2 000. The MT50 table's runs (docs/metaworld.md)
  continue its last checkpoint in a new workdir with `--config.train.num_steps=16000`."""
  c = _metaworld_tiny()
  c.train.num_steps = 8000
  c.checkpoint.update(every=500, keep_last=2, keep_every=2000)
  return c


def _metaworld_mt50_monolithic():
  c = _metaworld_mt50()
  c.model.variant = "monolithic"
  return c


def _small():
  c = _base("small")
  c.model.action_expert.update(num_layers=4, num_heads=4, head_dim=64, num_future_tokens=32,
                               hidden_dim=256)
  return c


def _qwen25vl_3b():
  c = _base("3b")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c


def _qwen25vl_7b():
  c = _base("7b")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c


def _qwen3vl_tiny():
  return _tiny("qwen3vl_tiny")


def _qwen3vl_4b():
  c = _base("qwen3vl_4b")
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c


def _lora(c: ml_collections.ConfigDict, rank: int, right_lr: float | None = None
          ) -> ml_collections.ConfigDict:
  """`c` fine-tuning the right brain through rank-`rank` adapters on every decoder projection
  (the state encoder and the action expert still train fully)."""
  c.model.lora.update(rank=rank, alpha=float(rank))
  if right_lr is not None:
    c.train.optimizer.lr.right = right_lr
  return c


PRESETS = dict(tiny=_tiny, small=_small, qwen25vl_3b=_qwen25vl_3b, qwen25vl_7b=_qwen25vl_7b,
               qwen3vl_tiny=_qwen3vl_tiny, qwen3vl_4b=_qwen3vl_4b,
               metaworld_tiny=_metaworld_tiny, metaworld_demo=_metaworld_demo,
               metaworld_tiny_monolithic=_metaworld_tiny_monolithic,
               metaworld_mt50=_metaworld_mt50,
               metaworld_mt50_monolithic=_metaworld_mt50_monolithic,
               metaworld_tiny_blind=_metaworld_tiny_blind,
               metaworld_tiny_qwen3vl=lambda: _metaworld_tiny("qwen3vl_tiny"),
               metaworld_tiny_monolithic_cotrain=_metaworld_tiny_monolithic_cotrain,
               # One-GPU fine-tuning: low-rank adapters on the right brain (docs/training.md).
               qwen25vl_3b_lora=lambda: _lora(_qwen25vl_3b(), 16, right_lr=1e-4),
               qwen25vl_7b_lora=lambda: _lora(_qwen25vl_7b(), 16, right_lr=1e-4),
               qwen3vl_4b_lora=lambda: _lora(_qwen3vl_4b(), 16, right_lr=1e-4),
               metaworld_tiny_lora=lambda: _lora(_metaworld_tiny(), 8))


def get_config(arg=None):
  return select_preset(arg, PRESETS, "configs/twinbrain.py", default="tiny")
