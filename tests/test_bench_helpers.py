"""The benchmark scripts' timing and table helpers in `cli`."""

import pytest

from twinbrain_jax import cli


def test_interleaved_seconds_alternates_blocks_each_after_a_warmup():
  calls = []
  fns = [lambda: calls.append("a"), lambda: calls.append("b")]
  timings = cli.interleaved_seconds(fns, runs=5, warmup=1, block=2)
  # Blocks of 2 timed calls, each after one untimed call; the last block holds the remainder.
  assert "".join(calls) == "aaa" "bbb" "aaa" "bbb" "aa" "bb"
  assert len(timings) == 2
  for median, minimum in timings:
    assert 0 <= minimum <= median


@pytest.mark.parametrize("block", [1, 3, 10])
def test_interleaved_seconds_times_each_function_runs_times(block):
  counts = {"a": 0, "b": 0}

  def count(name):
    counts[name] += 1

  cli.interleaved_seconds([lambda: count("a"), lambda: count("b")], runs=7, warmup=0,
                          block=block)
  assert counts == {"a": 7, "b": 7}


def test_markdown_table():
  table = cli.markdown_table(["preset", "ms"], [["tiny", "1.0"], ["small", "2.5"]])
  assert table.splitlines() == ["| preset | ms |", "| --- | --- |", "| tiny | 1.0 |",
                                "| small | 2.5 |"]
