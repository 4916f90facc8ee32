"""Text alignment of `eval=synthetic` (eval.protocols.synthetic.attribute_accuracy) on hand-made recogniser outputs
whose accuracies are known."""
from __future__ import annotations

import pytest
import torch

from datamodules.synthetic import COLOURS, MOTIONS, SHAPES
from eval.protocols.synthetic import attribute_accuracy

PROMPTS = [
    "a red circle moving left on a dark background",  # (circle, red, left)
    "a blue square growing on a light background",  # (square, blue, grow)
    "a green star on a gray background",  # (star, green, no motion named)
    "a yellow cross standing still on a checkered background",  # (cross, yellow, still)
]


def predicted(shapes, colours, motions) -> dict[str, torch.Tensor]:
    """What a recogniser 'saw', by name -> indices into SHAPES, COLOURS, MOTIONS (as attribute_predictions gives)."""
    return {"shape": torch.tensor([SHAPES.index(s) for s in shapes]),
            "colour": torch.tensor([COLOURS.index(c) for c in colours]),
            "motion": torch.tensor([MOTIONS.index(m) for m in motions])}


def test_a_perfect_recogniser_scores_one():
    scores = attribute_accuracy(PROMPTS, predicted(["circle", "square", "star", "cross"],
                                                   ["red", "blue", "green", "yellow"],
                                                   ["left", "grow", "rotate", "still"]))
    assert scores == {"acc_shape": 1.0, "acc_colour": 1.0, "acc_motion": 1.0, "text_alignment": 1.0}


def test_known_mistakes_give_known_accuracies():
    scores = attribute_accuracy(PROMPTS, predicted(
        ["circle", "circle", "star", "square"],  # 2 of 4 right
        ["red", "blue", "green", "red"],  # 3 of 4 right
        ["right", "grow", "left", "still"],  # video 2 names no motion: 2 of 3 right
    ))
    assert scores["acc_shape"] == 2 / 4 and scores["acc_colour"] == 3 / 4
    assert scores["acc_motion"] == pytest.approx(2 / 3)
    assert scores["text_alignment"] == pytest.approx((2 / 4 + 3 / 4 + 2 / 3) / 3)


def test_an_attribute_no_prompt_names_is_left_out():
    scores = attribute_accuracy(["a red circle", "a blue circle"],
                                predicted(["circle", "star"], ["red", "red"], ["left", "left"]))
    assert scores == {"acc_shape": 0.5, "acc_colour": 0.5, "text_alignment": 0.5}


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="4 prompts but 3 shape predictions"):
        attribute_accuracy(PROMPTS, predicted(["circle"] * 3, ["red"] * 4, ["left"] * 4))
    with pytest.raises(ValueError, match="no prompt names"):
        attribute_accuracy(["a cat"], predicted(["circle"], ["red"], ["left"]))
