"""The geometric recogniser (`eval.synthetic_geometry`) that `make demo` reports with: it must read what the dataset
drew, and must not read a motion or shape into a clip that does not show it."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.synthetic import MOTIONS, SHAPES, Attributes, Layout, render, render_item
from eval.synthetic_geometry import Reading, read_video

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}


@pytest.mark.parametrize("split", ["val", "test"])
def test_reads_every_rendered_clip(split):
    """Exact on the dataset's own clips, jitter included, for every shape, colour and motion that occurs."""
    seen = {"shape": set(), "motion": set()}
    for index in range(80):
        attributes, frames = render_item(index, 8, (32, 32), seed=0, split=split)
        reading = read_video(frames)
        assert reading == Reading(attributes.shape, attributes.colour, attributes.motion), (index, attributes)
        seen["shape"].add(attributes.shape)
        seen["motion"].add(attributes.motion)
    assert seen == {"shape": set(SHAPES), "motion": set(MOTIONS)}  # the loop covered every value


def test_mild_pixel_noise_does_not_change_the_reading():
    rng = np.random.default_rng(0)
    for index in range(40):
        attributes, frames = render_item(index, 8, (32, 32), split="test")
        noisy = np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
        assert read_video(noisy) == Reading(attributes.shape, attributes.colour, attributes.motion), index


def test_reversed_clip_reads_as_the_opposite_motion():
    """Direction comes from the order of the frames, not from where the object is."""
    for motion, opposite in OPPOSITE.items():
        frames = render(Attributes("square", "red", motion, "gray"), 8, (32, 32))
        assert read_video(frames).motion == motion
        assert read_video(frames[::-1]).motion == opposite


def test_still_frames_read_as_still_and_a_turning_shape_as_rotating():
    layout = Layout(0.52, 0.47, 0.3, 0.1, 1.0)
    still = render(Attributes("star", "blue", "still", "dark"), 8, (32, 32), layout)
    assert read_video(still) == Reading("star", "blue", "still")
    assert read_video(np.repeat(still[:1], 8, axis=0)).motion == "still"
    turning = render(Attributes("cross", "green", "rotate", "light"), 8, (32, 32), layout)
    assert read_video(turning) == Reading("cross", "green", "rotate")


def test_a_clip_with_no_object_in_some_frame_has_no_shape_or_motion():
    frames = render(Attributes("circle", "yellow", "left", "checkered"), 8, (32, 32))
    background = render(Attributes("circle", "yellow", "left", "checkered"), 8, (32, 32), Layout(5.0, 5.0, 0.3, 0, 1))
    assert read_video(background) == Reading(None, None, None)  # drawn far outside the frame: background only
    frames[3] = background[3]
    reading = read_video(frames)
    assert reading.shape is None and reading.motion is None and reading.colour == "yellow"
