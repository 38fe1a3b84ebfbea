"""Published-layout TFRecord RLDS data -> ArrayRecord -> pipeline, through the documented script.

The source datasets are written by TFDS itself in the TFRecord layout OXE is published in (JPEG
cameras, several shards) with the awkward episodes real downloads hold: a 1-step bridge episode,
an episode truncated by a time limit and an empty instruction. The reference for every array is
TensorFlow's own reading of the TFRecord source (`as_dataset`), independent of the converter.

TensorFlow runs only in subprocesses: once it is loaded (it makes its LLVM symbols global), Mesa's
software OpenGL segfaults in the same process, and pytest workers also run the Meta-World
rendering tests (`conftest.py` fails any test that loads TensorFlow into a worker).
"""

import hashlib
import json
import os
import pathlib
import pickle
import shutil
import sys
import textwrap

import absl.flags
import grain
import numpy as np
import pytest

import processes
from fixtures_data import small_config
from fixtures_training import REPO, tiny_config
from twinbrain_jax.data import generate, oxe_registry, pipeline, rlds
from twinbrain_jax.training import demo_data, loop

absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

BRIDGE_FAULTS = {"one_step": 1, "truncated": 2, "empty_instruction": 3}
NUM_EPISODES = 6


_GENERATE = textwrap.dedent("""
    import sys
    from twinbrain_jax.data import generate
    root = sys.argv[1]
    generate.generate_dataset(generate.BRIDGE, root, num_episodes=%d, min_steps=4, max_steps=7,
                              seed=3, faults=%r, file_format="tfrecord", num_shards=3)
    generate.generate_dataset(generate.FRACTAL, root, num_episodes=4, min_steps=4, max_steps=6,
                              seed=4, file_format="tfrecord", num_shards=2)
    """) % (NUM_EPISODES, BRIDGE_FAULTS)

# Every bridge episode as TensorFlow reads the TFRecord source: encoded images, arrays, strings,
# and the first frame decoded by TensorFlow's JPEG decoder.
_TF_REFERENCE = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(sys.argv[1])
    decoders = {"steps": {"observation": {"image_0": tfds.decode.SkipDecoding()}}}
    episodes = []
    for record in tfds.as_numpy(builder.as_dataset(split="train", decoders=decoders,
                                                   shuffle_files=False)):
      steps = list(record["steps"])
      images = [s["observation"]["image_0"] for s in steps]
      episodes.append(dict(
          metadata=record["episode_metadata"], image_0=images,
          first_frame=tf.io.decode_jpeg(images[0]).numpy(),
          state=np.stack([s["observation"]["state"] for s in steps]),
          action=np.stack([s["action"] for s in steps]),
          instruction=[s["language_instruction"].decode() for s in steps],
          is_terminal=[bool(s["is_terminal"]) for s in steps]))
    with open(sys.argv[2], "wb") as f:
      pickle.dump(episodes, f)
    """)


def _python(tmp_path, script: str, *args: str):
  done = processes.run([sys.executable, "-c", script, *args],
                       tmp_path / f"log{len(list(tmp_path.glob('log*')))}", cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """A TFDS data dir with TFRecord bridge (3 shards, awkward episodes) and fractal (2 shards)."""
  root = tmp_path_factory.mktemp("published")
  _python(tmp_path_factory.mktemp("logs"), _GENERATE, str(root))
  return str(root)


def _copy(published, tmp_path) -> str:
  data_dir = str(tmp_path / "tfds")
  shutil.copytree(published, data_dir)
  return data_dir


def _tree_digest(directory: str) -> dict[str, str]:
  return {name: hashlib.sha1(pathlib.Path(directory, name).read_bytes()).hexdigest()
          for name in sorted(os.listdir(directory))}


def _convert_script(tmp_path, *flags):
  return processes.run([sys.executable, "scripts/convert_tfrecord.py", *flags],
                       tmp_path / f"log{len(list(tmp_path.glob('log*')))}", cwd=REPO)


def _tf_reference(dataset_dir: str, tmp_path) -> list[dict]:
  out = tmp_path / "tf_reference.pkl"
  _python(tmp_path, _TF_REFERENCE, dataset_dir, str(out))
  with open(out, "rb") as f:
    return pickle.load(f)


def _assert_equal_to_source(dataset: rlds.RldsDataset, reference: list[dict]):
  by_id = {int(ep["metadata"]["episode_id"]): ep for ep in reference}
  assert len(dataset) == len(reference) == NUM_EPISODES
  for index in range(len(dataset)):
    episode = dataset.episode(index)
    want = by_id[int(episode.episode_id)]
    assert episode.where().endswith(
        f"(episode_id='{episode.episode_id}', "
        f"file_path='{want['metadata']['file_path'].decode()}')")
    assert len(episode) == len(want["action"])
    raw = episode.lowdim()
    np.testing.assert_array_equal(raw["action"], want["action"])
    np.testing.assert_array_equal(raw["observation/state"], want["state"])
    for t in range(len(episode)):
      assert episode.instruction(t) == want["instruction"][t]
      assert episode._step(t)["observation"]["image_0"] == want["image_0"][t]  # Same JPEG bytes.
    # The bytes are equal; PIL and TF's JPEG decoders round differently (IDCT, upsampling).
    error = np.abs(episode.image(0, "image_0").astype(int) - want["first_frame"])
    assert error.max() <= 4 and error.mean() < 1.0


def test_out_dir_conversion_is_complete_and_leaves_the_source_alone(published, tmp_path):
  data_dir = _copy(published, tmp_path)
  source = rlds.resolve_dataset_dir(data_dir, generate.BRIDGE)
  before = _tree_digest(source)
  out = tmp_path / "converted"
  # One worker: the case that used to fail ("Found 0 shards").
  done = _convert_script(tmp_path, f"--dataset_dir={source}", f"--out_dir={out}",
                         "--num_workers=1")
  assert done.returncode == 0, done.stderr[-3000:]
  target = out / generate.BRIDGE / "1.0.0"
  assert f"-> {target}: 3 shards, train {NUM_EPISODES} episodes" in done.stdout
  assert _tree_digest(source) == before
  assert sorted(os.listdir(target)) == [
      f"bridge_dataset-train.array_record-0000{i}-of-00003" for i in range(3)] + [
          "dataset_info.json", "features.json"]
  info = json.loads((target / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record" and not info.get("alternativeFileFormats")
  dataset = rlds.RldsDataset(str(target), oxe_registry.get_spec(generate.BRIDGE))
  _assert_equal_to_source(dataset, _tf_reference(source, tmp_path))
  # A second run does not clobber the result without --overwrite; with it, it replaces it.
  again = _convert_script(tmp_path, f"--dataset_dir={source}", f"--out_dir={out}")
  assert again.returncode != 0 and "exists; pass overwrite=True" in again.stderr
  assert "converted" not in again.stdout
  again = _convert_script(tmp_path, f"--dataset_dir={source}", f"--out_dir={out}", "--overwrite")
  assert again.returncode == 0, again.stderr[-3000:]
  assert not [p for p in (out / generate.BRIDGE).iterdir() if p.name != "1.0.0"]


def test_in_place_conversion_is_read_and_trains(published, tmp_path):
  data_dir = _copy(published, tmp_path)
  for name in (generate.BRIDGE, generate.FRACTAL):
    # The default worker count (8, more than there are shards): the case that printed success.
    done = _convert_script(tmp_path, f"--dataset_dir={rlds.resolve_dataset_dir(data_dir, name)}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converted" in done.stdout and "checked against the source" in done.stdout
  source = rlds.resolve_dataset_dir(data_dir, generate.BRIDGE)
  info = json.loads(pathlib.Path(source, "dataset_info.json").read_text())
  # The layout `tfds convert_format` writes in place: TFRecord stays the main format.
  assert info["fileFormat"] == "tfrecord" and info["alternativeFileFormats"] == ["array_record"]
  _assert_equal_to_source(rlds.RldsDataset(source, oxe_registry.get_spec(generate.BRIDGE)),
                          _tf_reference(source, tmp_path))
  again = _convert_script(tmp_path, f"--dataset_dir={source}")
  assert again.returncode == 0 and "already converted" in again.stdout

  # The pipeline with default settings: the 1-step episode is skipped and counted, not an error.
  config = small_config(data_dir, datasets=(generate.BRIDGE,), weights=(1.0,), num_epochs=1,
                        shuffle=False)
  pipe = pipeline.DataPipeline(config, train=False, shard_options=grain.sharding.ShardOptions(0, 1))
  assert pipe.num_empty == {generate.BRIDGE: 1} and pipe.num_skipped == {generate.BRIDGE: 0}
  stats = pipe.norm_stats[generate.BRIDGE]
  assert stats.episode_lengths[1] == 0 and "no steps left" in stats.empty["1"]
  assert "episode_id='1'" in stats.empty["1"]
  samples = [pipe.samples[i] for i in range(len(pipe.samples))]
  assert {str(s["episode_id"]) for s in samples} == {"0", "2", "3", "4", "5"}
  assert {s["instruction"] for s in samples if s["episode_id"] == "3"} == {""}

  # And a training run reads the converted data.
  config = demo_data.prepare(tiny_config((8, 1, 1)), str(tmp_path / "run"), num_episodes=2,
                             num_eval_episodes=1)
  config.data.data_dir = data_dir
  config.train.update(num_steps=2, log_every=1, eval_data_dir=None, progress_bar=False)
  result = loop.train(config, str(tmp_path / "run"))
  assert result.final_step == 2 and all(np.isfinite(v) for v in result.losses.values())


def test_published_info_without_a_file_format_converts(published, tmp_path):
  """Older TFDS versions (much of OXE) leave `fileFormat` out: it means TFRecord."""
  data_dir = _copy(published, tmp_path)
  source = rlds.resolve_dataset_dir(data_dir, generate.FRACTAL)
  info_path = pathlib.Path(source, "dataset_info.json")
  info = json.loads(info_path.read_text())
  del info["fileFormat"]
  info_path.write_text(json.dumps(info))
  done = _convert_script(tmp_path, f"--dataset_dir={source}", "--num_workers=2")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "2 shards, train 4 episodes" in done.stdout
  assert len(rlds.RldsDataset(source, oxe_registry.get_spec(generate.FRACTAL))) == 4


@pytest.mark.parametrize("in_place", [True, False])
def test_a_bad_shard_fails_naming_it_and_publishes_nothing(published, tmp_path, in_place):
  data_dir = _copy(published, tmp_path)
  source = rlds.resolve_dataset_dir(data_dir, generate.BRIDGE)
  bad = pathlib.Path(source, "bridge_dataset-train.tfrecord-00001-of-00003")
  bad.write_bytes(bad.read_bytes()[:-100])  # A truncated download.
  pathlib.Path(source, "bridge_dataset-train.tfrecord-00002-of-00003").unlink()  # A missing one.
  before = _tree_digest(source)
  out = tmp_path / "converted"
  flags = [f"--dataset_dir={source}"] + ([] if in_place else [f"--out_dir={out}"])
  done = _convert_script(tmp_path, *flags)
  assert done.returncode != 0
  assert "2 of 3 shards failed" in done.stderr
  assert "tfrecord-00001-of-00003: DataLossError" in done.stderr
  assert "tfrecord-00002-of-00003: FileNotFoundError" in done.stderr
  assert "converted" not in done.stdout
  assert _tree_digest(source) == before  # No shard, no info change, no temporary file.
  assert not out.exists() or not any(out.rglob("*array_record*"))
  with pytest.raises(rlds.DataError, match="stored as 'tfrecord'.*convert_tfrecord.py"):
    rlds.RldsDataset(source, oxe_registry.get_spec(generate.BRIDGE))


def test_conversion_without_tensorflow_says_how_to_install_it(tmp_path):
  script = ("import sys; sys.modules['tensorflow'] = None\n"
            "from twinbrain_jax.data import convert\n"
            f"convert.convert_to_array_record({str(tmp_path)!r})\n")
  done = processes.run([sys.executable, "-c", script], tmp_path / "log", cwd=REPO)
  assert done.returncode != 0
  assert "needs TensorFlow" in done.stderr and ".[tf]" in done.stderr

