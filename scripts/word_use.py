"""Which caption words does a trained diffusion model use? Its loss with true captions against swapped ones.

    python scripts/word_use.py RUN/checkpoints/step_000750.ckpt [--config RUN/config.yaml] [--items 24]

For `--items` held-out synthetic clips (val split) and fixed noise, prints the diffusion loss at a few timesteps with
the true captions and with one word swapped for another value of its attribute (shape, motion, colour). A model that
ignores a word has the same loss either way; the relative increase at the noisiest timestep, where the caption is
all there is to go on, says how much the model relies on it (docs/tiny_lavie.md, session 6).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from datamodules.synthetic import COLOURS, MOTIONS, SHAPES, caption_for, render_item  # noqa: E402
from datamodules.transforms import to_model_range  # noqa: E402
from utils.generators import load_training_checkpoint  # noqa: E402

VALUES = {"shape": SHAPES, "motion": MOTIONS, "colour": COLOURS}


def swapped_caption(attributes, attribute: str, index: int) -> str:
    """The caption with `attribute` replaced by another value the dataset can draw (chosen by the item index)."""
    fields = attributes._asdict()
    others = [v for v in VALUES[attribute] if v != fields[attribute]]
    if attribute == "shape" and fields["motion"] == "rotate":
        others = [v for v in others if v != "circle"]  # never drawn: a rotating circle looks still
    fields[attribute] = others[index % len(others)]
    return caption_for(fields["shape"], fields["colour"], fields["motion"], fields["background"])


@torch.no_grad()
def word_use(model, num_items: int, timesteps: tuple[int, ...]
             ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, float]]]:
    """(text features of the true and swapped captions, {t: {caption kind: diffusion loss}})."""
    frames, size = model.sampler["num_frames"], (model.sampler["height"], model.sampler["width"])
    items = [render_item(i, frames, size, seed=0, split="val") for i in range(num_items)]
    video = torch.stack([torch.as_tensor(to_model_range(pixels)) for _, pixels in items])
    captions = {"true": [caption_for(*attributes) for attributes, _ in items]}
    for attribute in VALUES:
        captions[attribute] = [swapped_caption(a, attribute, i) for i, (a, _) in enumerate(items)]
    contexts = {name: model.encode_prompts(texts) for name, texts in captions.items()}
    return contexts, _losses(model, video, contexts, timesteps)


def encoder_distance(contexts: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far apart the text encoder keeps each swapped word from the true one: per caption, the distance between
    the two captions' features at the swapped word's first token, averaged over the captions. CLIP's text encoder is
    causal, so that is the first position where the features differ; later positions also differ when the two
    phrases have different token counts. A word the encoder has squeezed out (after training with a UNet that never
    used it) is near 0 however it is spelled."""
    true, distances = contexts["true"], {}
    for attribute in VALUES:
        per_position = (contexts[attribute] - true).norm(dim=-1)  # (N, L)
        first = (per_position > 1e-4).float().argmax(dim=-1)  # the swapped word's first token
        distances[attribute] = float(per_position.gather(1, first[:, None]).mean())
    return distances


def _losses(model, video: torch.Tensor, contexts: dict[str, torch.Tensor], timesteps: tuple[int, ...]):
    num_items = video.shape[0]
    latents = model.autoencoder.encode(video)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    losses = {}
    for t in timesteps:
        steps = torch.full((num_items,), t)
        noisy = model.train_scheduler.add_noise(latents, noise, steps)
        target = model.prediction_target(latents, noise, steps)
        losses[t] = {name: float((model.unet(noisy, steps, context) - target).pow(2).mean())
                     for name, context in contexts.items()}
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: next to checkpoints/)")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[300, 500, 700, 900])
    args = parser.parse_args()
    config = args.config or args.checkpoint.resolve().parents[1] / "config.yaml"
    if not config.is_file():
        parser.error(f"no run config at {config}; pass --config RUN/config.yaml")
    model = instantiate(OmegaConf.load(config).model, _convert_="all")
    load_training_checkpoint(model, args.checkpoint)
    contexts, losses = word_use(model.eval(), args.items, tuple(args.timesteps))
    print("t     true     " + "  ".join(f"{a} swapped" for a in VALUES))
    for t, row in losses.items():
        print(f"{t:<5} {row['true']:.4f}   " + "  ".join(
            f"{row[a]:.4f} ({100 * (row[a] / row['true'] - 1):+.1f}%)".ljust(len(a) + 8) for a in VALUES))
    distances = encoder_distance(contexts)
    print("text-encoder distance, true vs swapped caption: "
          + ", ".join(f"{a} {distances[a]:.2f}" for a in VALUES))


if __name__ == "__main__":
    main()
