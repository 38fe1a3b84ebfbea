"""Observation formats: openpi's example observations map onto the policy's own keys."""

import numpy as np
import pytest

from fixtures_serving import openpi_example
from twinbrain_jax.serving import formats
from twinbrain_jax.serving.policy import ObservationError


def test_openpi_layouts_map_to_the_policy_keys():
  libero = openpi_example("libero")
  mapped = formats.to_policy_observation(formats.get_format("libero"), dict(libero, seed=3))
  assert mapped["image"][0] is libero["observation/image"]
  assert mapped["image"][1] is libero["observation/wrist_image"]
  np.testing.assert_array_equal(mapped["state"], libero["observation/state"])
  assert mapped["instruction"] == "do something" and mapped["seed"] == 3

  droid = openpi_example("droid")
  mapped = formats.to_policy_observation(formats.get_format("droid"), droid)
  np.testing.assert_array_equal(mapped["state"], np.concatenate(
      [droid["observation/joint_position"], droid["observation/gripper_position"]]))
  assert mapped["image"][0] is droid["observation/exterior_image_1_left"]
  # openpi's DROID transform also takes a scalar gripper position.
  scalar = dict(droid, **{"observation/gripper_position": np.float64(0.25)})
  assert formats.to_policy_observation(formats.get_format("droid"), scalar)["state"][-1] == 0.25

  aloha = openpi_example("aloha")
  mapped = formats.to_policy_observation(formats.get_format("aloha"), aloha)
  assert [i.shape for i in mapped["image"]] == [(224, 224, 3)] * 4
  # Channels first -> channels last, pixel for pixel; cam_high is the primary camera.
  np.testing.assert_array_equal(mapped["image"][0],
                                aloha["images"]["cam_high"].transpose(1, 2, 0))
  np.testing.assert_array_equal(mapped["image"][3],
                                aloha["images"]["cam_right_wrist"].transpose(1, 2, 0))
  np.testing.assert_array_equal(mapped["state"], aloha["state"])


def test_the_native_format_passes_observations_through():
  obs = dict(image=np.zeros((4, 4, 3), np.uint8), state=np.zeros(7), instruction="x")
  assert formats.to_policy_observation(formats.get_format("twinbrain"), obs) is obs


def test_optional_cameras_may_be_left_out():
  aloha = openpi_example("aloha")
  del aloha["images"]["cam_low"], aloha["images"]["cam_left_wrist"]
  mapped = formats.to_policy_observation(formats.get_format("aloha"), aloha)
  assert len(mapped["image"]) == 2


BAD = [
    ("libero", lambda o: o.pop("observation/image"), r"no 'observation/image' \(got keys"),
    ("libero", lambda o: o.pop("prompt"), "no 'prompt'"),
    ("droid", lambda o: o.pop("observation/gripper_position"), "'observation/gripper_position'"),
    ("aloha", lambda o: o.pop("images"), r"no images\['cam_high'\]"),
    ("aloha", lambda o: o.update(images=np.zeros(3)), r"observation\['images'\] is a ndarray; "
                                                       "the aloha format expects a dict"),
    ("aloha", lambda o: o["images"].update(cam_high=np.zeros((224, 224, 3), np.uint8)),
     r"observation\['images'\]\['cam_high'\] has shape \(224, 224, 3\); .*channels first"),
    ("libero", lambda o: o.update({"observation/wrist_image": np.zeros((8, 8, 3), np.float32)}),
     r"observation\['observation/wrist_image'\] has dtype float32"),
    ("libero", lambda o: o.update({"observation/state": [[1.0, 2.0], [3.0]]}), "ragged"),
    ("libero", lambda o: o.update({"observation/state": np.zeros((2, 4))}),
     r"has shape \(2, 4\); send a number or a flat array"),
    ("droid", lambda o: o.update({"observation/joint_position": "1,2,3"}), "is a str"),
    ("droid", lambda o: o.update({"observation/joint_position": [None] * 7}), "holds object"),
]


@pytest.mark.parametrize("name, change, message", BAD)
def test_bad_layouts_are_named_in_the_clients_keys(name, change, message):
  obs = openpi_example(name)
  change(obs)
  with pytest.raises(ObservationError, match=message):
    formats.to_policy_observation(formats.get_format(name), obs)


def test_unknown_format_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"'libro'.*\['aloha', 'droid', 'libero', 'twinbrain'\]"):
    formats.get_format("libro")


def test_explain_adds_the_layout_to_policy_errors():
  error = formats.get_format("droid").explain(ObservationError("observation['state'] has shape"))
  assert "'state' is observation/joint_position ‖ observation/gripper_position" in str(error)
