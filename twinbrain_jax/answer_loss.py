"""The VLM objective: next-token cross-entropy on the answer tokens only.

A question-answer example is one left-padded row of token ids

    [pad ... pad | <|im_start|>user\\n <image tokens> question <|im_end|>\\n <|im_start|>assistant\\n
                 | answer <|im_end|>]

The target of position i is the id at i + 1; the loss mask is 1 exactly where that target is an
answer token (the answer and its closing `<|im_end|>`): padding, the chat template, the image
tokens and the question are context, never targets. A row with an empty answer (a robot sample in
a co-training batch) has no target at all.

`answer_rows` builds the rows on the host (numpy); `answer_loss` is the pure loss on the model's
logits, the sibling of `flow_matching.flow_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def answer_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], length: int,
                pad_id: int) -> dict[str, np.ndarray]:
  """Prompt + answer token rows -> the model's inputs and targets, left-padded to `length`.

  Args:
    prompts: per row, the chat prompt's ids (image tokens and question included).
    answers: per row, the answer's ids including its closing `<|im_end|>`; empty for none.
    length: L, the fixed row length.
    pad_id: the padding id.

  Returns:
    input_ids [B, L] int32, attention_mask [B, L] int32, targets [B, L] int32 (the next id;
    `pad_id` at the last position) and loss_mask [B, L] float32 (1 where the target is an
    answer token).
  """
  batch = len(prompts)
  ids = np.full((batch, length), pad_id, np.int32)
  attention = np.zeros((batch, length), np.int32)
  is_answer = np.zeros((batch, length), bool)
  for b, (prompt, answer) in enumerate(zip(prompts, answers)):
    row = [*prompt, *answer]
    if len(row) > length:
      raise ValueError(f"A question-answer row has {len(row)} tokens ({len(prompt)} prompt + "
                       f"{len(answer)} answer), more than inputs.max_lm_tokens={length}; raise "
                       "it or shorten the question.")
    ids[b, length - len(row):], attention[b, length - len(row):] = row, 1
    if answer:
      is_answer[b, length - len(answer):] = True
  targets = np.full_like(ids, pad_id)
  targets[:, :-1] = ids[:, 1:]
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, :-1] = is_answer[:, 1:]
  return dict(input_ids=ids, attention_mask=attention, targets=targets, loss_mask=loss_mask)


def answer_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over the answer tokens.

  Args:
    logits: [B, L, V] the model's logits at every position.
    targets: [B, L] int, the next token of every position.
    loss_mask: [B, L], 1 where the target is an answer token.

  Returns:
    (scalar float32 loss: summed masked cross-entropy over the number of answer tokens, 0 when
    there are none; metrics `answer_token_accuracy` (argmax = target on answer tokens) and
    `answer_tokens` (their count)).
  """
  logits = logits.astype(jnp.float32)
  mask = loss_mask.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]  # [B, L]
  count = jnp.sum(mask)
  loss = -jnp.sum(target_log_probs * mask) / jnp.maximum(count, 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * mask) / jnp.maximum(count, 1.0)
  return loss, dict(answer_token_accuracy=accuracy, answer_tokens=count)


def answer_log_likelihood(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                          ) -> jax.Array:
  """Per row, the summed log-probability of its answer tokens, [B] float32 (scoring a closed
  answer set by likelihood: one row per candidate answer)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]
  return jnp.sum(target_log_probs * loss_mask.astype(jnp.float32), axis=-1)
