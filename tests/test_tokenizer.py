"""The Qwen chat-template tokenizer over a small byte-level BPE `tokenizer.json` built here."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from twinbrain_jax.models import qwen25vl
from twinbrain_jax.models.backbone_presets import backbone_preset
from twinbrain_jax.models.image_processor import preprocess_images
from twinbrain_jax.models.tokenizer import (IMAGE_PAD, SPECIAL_TOKENS, QwenTokenizer,
                                            num_image_tokens)

CORPUS = ["pick up the coke can and place it in the drawer",
          "move the sponge to the left of the blue cloth",
          "put the carrot on the plate", "user assistant system you are a helpful robot"] * 20


def _build_tokenizer(special_tokens=SPECIAL_TOKENS) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tokenizer")
  _build_tokenizer().save(str(path / "tokenizer.json"))
  return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
  return QwenTokenizer.from_pretrained(tokenizer_dir)


def test_template_text_for_two_images(tok):
  ids = tok.encode_chat("put the carrot on the plate", image_tokens=[4, 6])
  expected = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
              "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>"
              "put the carrot on the plate<|im_end|>\n<|im_start|>assistant\n")
  assert tok.decode(ids, skip_special_tokens=False) == expected
  assert ids.count(tok.image_pad_id) == 10


def test_encode_chat_equals_encoding_the_whole_template(tok):
  """Inserting special ids by hand gives what the BPE gives on the full template string."""
  for text, images, system in [("move the sponge to the left", [64], None),
                               ("pick up the coke can", [], None),
                               ("put the carrot on the plate", [3, 5], "You are a robot.")]:
    prompt = tok.chat_prompt(text, images, system)
    whole = tok.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert tok.encode_chat(text, images, system) == whole
  assert tok.decode(tok.encode("pick up the can")) == "pick up the can"


def test_num_image_tokens_of_a_224_image():
  _, grid = preprocess_images([np.zeros((224, 224, 3), np.uint8), np.zeros((112, 168, 3),
                                                                           np.uint8)])
  assert num_image_tokens(grid) == [64, 24]


def test_batch_is_left_padded(tok):
  texts = ["pick up the coke can and place it in the drawer", "put the carrot"]
  batch = tok.batch_encode_chat(texts, [[4], []])
  lengths = [len(tok.encode_chat(t, n)) for t, n in zip(texts, [[4], []])]
  np.testing.assert_array_equal(batch.attention_mask.sum(1), lengths)
  short = int(np.argmin(lengths))
  pad = batch.input_ids.shape[1] - lengths[short]
  assert np.all(batch.input_ids[short, :pad] == tok.pad_id)
  assert np.all(batch.attention_mask[short, :pad] == 0)
  assert batch.input_ids[short, pad:].tolist() == tok.encode_chat(texts[short], [])
  assert tok.batch_encode_chat(texts, [[4], []], pad_to=64).input_ids.shape == (2, 64)
  with pytest.raises(ValueError, match="pad_to"):
    tok.batch_encode_chat(texts, [[4], []], pad_to=5)
  with pytest.raises(ValueError, match="one"):
    tok.batch_encode_chat(texts, [[4]])


def test_batch_feeds_get_rope_index(tok):
  """Token ids from the template drive the model's position ids (image grid from the pads)."""
  bb = backbone_preset("tiny")
  for field, token in dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                           vision_start_token_id="<|vision_start|>",
                           vision_end_token_id="<|vision_end|>").items():
    bb[field] = tok.special_ids[token]
  config = qwen25vl.Qwen25VLConfig.from_config_dict(bb)
  tok.check_ids(config)
  grid = np.array([[1, 4, 6], [1, 4, 4]])
  batch = tok.batch_encode_chat(["put the carrot", "pick up the can"],
                                [[n] for n in num_image_tokens(grid)])
  positions, _ = qwen25vl.get_rope_index(batch.input_ids, grid, batch.attention_mask, config)
  first_pad = list(batch.input_ids[0]).index(tok.image_pad_id)
  # The 2x3 merged grid of the first image: heights 0,0,0,1,1,1 after the offset.
  np.testing.assert_array_equal(positions[1, 0, first_pad:first_pad + 6] - positions[1, 0,
                                                                                  first_pad],
                                [0, 0, 0, 1, 1, 1])


def test_errors(tokenizer_dir, tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    QwenTokenizer.from_file(tmp_path)
  without_pad = _build_tokenizer([t for t in SPECIAL_TOKENS if t != IMAGE_PAD])
  with pytest.raises(ValueError, match="image_pad"):
    QwenTokenizer(without_pad)
  config = qwen25vl.Qwen25VLConfig.from_config_dict(backbone_preset("tiny"))
  with pytest.raises(ValueError, match="image_token_id"):
    tok.check_ids(config)
  assert json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
