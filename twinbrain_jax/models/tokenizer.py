"""Qwen2.5-VL tokenizer: a thin wrapper over `tokenizers` with the chat template for image prompts.

    tok = QwenTokenizer.from_pretrained(checkpoint_dir)          # reads tokenizer.json
    ids = tok.encode_chat("pick up the can", image_tokens=[64])  # one 224x224 image
    batch = tok.batch_encode_chat(texts, image_tokens=[[64], [64]])  # left padded

A user turn with images is

    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n

with one `<|image_pad|>` per merged image token (`t * h * w / merge**2` of the image's patch
grid, see `num_image_tokens`), which the model replaces by the vision features. The template's
special tokens are inserted by id (no string of thousands of pads goes through the tokenizer);
the result equals encoding the whole template string, which the tests check.

Qwen3-VL checkpoints use the same tokenizer class, special tokens and user-turn layout (their
chat template writes a system turn only when one is given, as `system=` does here), so this
class serves both backbone families.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers

TOKENIZER_FILE = "tokenizer.json"

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def num_image_tokens(image_grid_thw: np.ndarray, spatial_merge_size: int = 2) -> list[int]:
  """[n_images, 3] patch grids -> how many `<|image_pad|>` tokens each image takes."""
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return [int(t * h * w) // spatial_merge_size ** 2 for t, h, w in grid]


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token-id rows -> (ids [B, length] int32, attention_mask [B, length] int32), left-padded.

  Rows longer than `length` are the caller's error to report; they are not truncated here.
  """
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
  return ids, mask


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
  """Left-padded token ids of a batch of prompts.

  Attributes:
    input_ids: [B, L] int32, padding is `pad_id`.
    attention_mask: [B, L] int32, 1 for tokens, 0 for padding.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray


class QwenTokenizer:
  """Byte-level BPE tokenizer of a Qwen2.5-VL checkpoint plus its chat template."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer
    ids = {}
    for token in SPECIAL_TOKENS:
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"The tokenizer has no special token {token!r}; a Qwen2.5-VL "
                         f"tokenizer.json defines {', '.join(SPECIAL_TOKENS)}.")
      ids[token] = token_id
    self.special_ids = ids

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> QwenTokenizer:
    """From a `tokenizer.json` file or a checkpoint directory holding one."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / TOKENIZER_FILE
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist; point at a checkpoint directory with a "
                              f"{TOKENIZER_FILE} (Hugging Face fast-tokenizer format).")
    return cls(tokenizers.Tokenizer.from_file(str(path)))

  from_pretrained = from_file

  # Ids of the template's special tokens.
  @property
  def pad_id(self) -> int:
    return self.special_ids[PAD]

  @property
  def image_pad_id(self) -> int:
    return self.special_ids[IMAGE_PAD]

  @property
  def vision_start_id(self) -> int:
    return self.special_ids[VISION_START]

  @property
  def vision_end_id(self) -> int:
    return self.special_ids[VISION_END]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def check_ids(self, config) -> None:
    """Raises when a `Qwen25VLConfig`'s special-token ids disagree with this tokenizer."""
    pairs = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                 vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    for field, token in pairs.items():
      if getattr(config, field) != self.special_ids[token]:
        raise ValueError(
            f"config.{field}={getattr(config, field)} but the tokenizer maps {token} to "
            f"{self.special_ids[token]}; load the config and tokenizer of the same checkpoint.")

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no template; like HF, special-token strings in `text` become those tokens."""
    return self._plain(text)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def _plain(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

  def chat_prompt(self, text: str, image_tokens: Sequence[int] = (),
                  system: str | None = None) -> str:
    """The template as a string (for display), each image expanded to its pad tokens."""
    images = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in image_tokens)
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    return f"{head}{IM_START}user\n{images}{text}{IM_END}\n{IM_START}assistant\n"

  def encode_chat(self, text: str, image_tokens: Sequence[int] = (),
                  system: str | None = None) -> list[int]:
    """Ids of a user turn with images followed by the assistant header.

    Args:
      text: the instruction.
      image_tokens: merged-token count of each image, in order (`num_image_tokens(grid)`).
      system: an optional system message turn before the user turn.
    """
    s = self.special_ids
    ids: list[int] = []
    if system is not None:
      ids += [s[IM_START], *self._plain("system\n" + system), s[IM_END], *self._plain("\n")]
    ids += [s[IM_START], *self._plain("user\n")]
    for n in image_tokens:
      if n <= 0:
        raise ValueError(f"An image must take at least one token, got {n}.")
      ids += [s[VISION_START]] + [s[IMAGE_PAD]] * int(n) + [s[VISION_END]]
    ids += [*self._plain(text), s[IM_END], *self._plain("\n"), s[IM_START],
            *self._plain("assistant\n")]
    return ids

  def batch_encode_chat(self, texts: Sequence[str], image_tokens: Sequence[Sequence[int]],
                        system: str | None = None, pad_to: int | None = None) -> EncodedBatch:
    """Encodes a batch of user turns and pads them on the left to a common length.

    Args:
      texts: B instructions.
      image_tokens: per prompt, the merged-token count of each of its images.
      system: optional system message for every prompt.
      pad_to: a fixed length L (e.g. to avoid recompiling); default the longest prompt.
    """
    if len(texts) != len(image_tokens):
      raise ValueError(f"{len(texts)} texts but {len(image_tokens)} image-token lists; give one "
                       "list (possibly empty) per prompt.")
    encoded = [self.encode_chat(t, n, system) for t, n in zip(texts, image_tokens)]
    length = max(len(e) for e in encoded) if pad_to is None else pad_to
    if any(len(e) > length for e in encoded):
      raise ValueError(f"A prompt has {max(len(e) for e in encoded)} tokens, more than "
                       f"pad_to={length}.")
    ids, mask = left_pad(encoded, length, self.pad_id)
    return EncodedBatch(input_ids=ids, attention_mask=mask)



def write_synthetic_tokenizer(directory: str | os.PathLike, config, corpus: Sequence[str],
                              reserved_ids: Sequence[int] = ()) -> QwenTokenizer:
  """Writes a small byte-level BPE `tokenizer.json` whose special tokens sit at `config`'s ids.

  For presets trained from scratch on generated data (no download): the Qwen template tokens
  get the ids of the `Qwen25VLConfig` (`image_token_id`, `vision_start_token_id`, ...), ids in
  `reserved_ids` (e.g. the right brain's `<|action|>` / `<|propri|>` rows) stay unused by the
  tokenizer, and the BPE merges are learned from `corpus`.

  Returns:
    The tokenizer read back from `directory/tokenizer.json`.
  """
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

  fixed = {config.vision_start_token_id: VISION_START, config.vision_end_token_id: VISION_END,
           config.image_token_id: IMAGE_PAD, config.video_token_id: VIDEO_PAD}
  first_fixed = min([*fixed, *reserved_ids])
  # <|endoftext|>, <|im_start|>, <|im_end|> take the three ids before the first fixed one.
  bpe_size = first_fixed - 3
  if bpe_size < 256 + 3:
    raise ValueError(f"Special-token ids from {first_fixed} leave no room for a byte-level BPE "
                     "(needs at least 259 ids below them).")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=bpe_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(corpus), trainer)
  filler = lambda i: AddedToken(f"<|reserved_{i}|>", special=True)
  tok.add_special_tokens([filler(i) for i in range(tok.get_vocab_size(), bpe_size)])
  tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD, IM_START, IM_END)])
  for token_id in range(first_fixed, max(fixed) + 1):
    tok.add_special_tokens([AddedToken(fixed[token_id], special=True) if token_id in fixed
                            else filler(token_id)])
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / TOKENIZER_FILE))
  result = QwenTokenizer.from_file(path)
  result.check_ids(config)
  return result
