"""EMA and SampleVideos on a tiny generator trained for a few CPU steps, plus the callbacks config group."""
from __future__ import annotations

import io

from pathlib import Path

import pytest
import torch
from PIL import Image
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from callbacks.data_skips import DataSkips
from callbacks.ema import EMA, RAW_KEY
from callbacks.exact_resume import ExactResume
from callbacks.finite_guard import NonFiniteGuard
from callbacks.interrupt_checkpoint import InterruptCheckpoint
from callbacks.sample_videos import SampleVideos
from datamodules.video_io import read_video
from modules.base import VideoGenerator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class TinyGenerator(VideoGenerator):
    """One trainable Linear and one frozen Linear (the stand-in for a frozen VAE / text encoder)."""

    fps = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.generate_calls: list[dict] = []
        self.val_weights: list[torch.Tensor] = []
        self.step_modes: list[tuple[bool, bool]] = []

    def on_train_start(self) -> None:
        self.frozen.eval()  # as real models keep frozen parts in eval mode; SampleVideos must not undo it

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.step_modes.append((self.training, self.frozen.training))
        return (self.net(self.frozen(batch)) - 1).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_weights.append(self.net.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=0.05)

    def generate(self, prompts, num_frames=None, seed=0, **overrides) -> torch.Tensor:
        self.generate_calls.append(
            dict(
                training=self.training,
                frozen_training=self.frozen.training,
                grad=torch.is_grad_enabled(),
                weight=self.net.weight.detach().clone(),
                num_frames=num_frames,
                seed=seed,
                overrides=overrides,
            )
        )
        # A deterministic function of the weights and the seed: one flat colour per frame.
        colours = []
        for s in self.seeds_for(prompts, seed):
            g = torch.Generator().manual_seed(s)
            colours.append(torch.sigmoid(self.net.weight.sum() + torch.randn(num_frames, 3, generator=g)))
        frames = torch.stack(colours)[:, :, None, None, :].expand(-1, -1, 16, 16, -1)  # (B, T, 16, 16, 3)
        return (frames * 255).round().to(torch.uint8)

    def load_pretrained(self, *args, **kwargs) -> None:
        raise NotImplementedError


class RawWeights(Callback):
    """The trained (non-averaged) weights after each optimizer step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append(pl_module.net.weight.detach().clone())


def loader() -> DataLoader:
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    return DataLoader(data, batch_size=4, shuffle=False)  # 4 steps per epoch


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        default_root_dir=tmp_path,
    )
    return Trainer(callbacks=callbacks, **(defaults | kwargs))


def expected_ema(w0: torch.Tensor, raw: list[torch.Tensor], decay: float, every: int = 1, start: int = 0):
    """The average after each step, computed by hand from the weights at fit start and after every step."""
    ema, out = w0.clone(), []
    for step, w in enumerate(raw, start=1):
        if step % every == 0:
            ema = w.clone() if step <= start else decay * ema + (1 - decay) * w
        out.append(ema.clone())
    return out


@pytest.mark.parametrize("every, start", [(1, 0), (2, 2)])
def test_ema_matches_hand_computed_and_is_in_validation_and_checkpoint(tmp_path, every, start):
    model = TinyGenerator()
    w0, frozen0 = model.net.weight.detach().clone(), model.frozen.weight.detach().clone()
    ema, raw = EMA(decay=0.5, update_every_n_steps=every, start_step=start), RawWeights()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(tmp_path, [ema, raw, checkpoint], max_steps=6, val_check_interval=4, limit_val_batches=1)
    trainer.fit(model, loader(), loader())

    want = expected_ema(w0, raw.weights, decay=0.5, every=every, start=start)
    assert len(raw.weights) == 6
    assert not torch.allclose(want[-1], raw.weights[-1])  # the average really differs from the weights
    # only the trainable Linear is copied: the frozen one is neither duplicated nor changed
    assert [p.shape for p in ema._shadow] == [torch.Size([3, 4]), torch.Size([3])]
    torch.testing.assert_close(model.frozen.weight, frozen0, rtol=0, atol=0)
    # validation after step 4 ran on the average, training went on from the raw weights
    torch.testing.assert_close(model.val_weights[0], want[3])
    # after fit the module holds the average
    torch.testing.assert_close(model.net.weight.detach(), want[-1])

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["net.weight"], want[-1])
    torch.testing.assert_close(ckpt[RAW_KEY]["net.weight"], raw.weights[-1], rtol=0, atol=0)
    assert set(ckpt[RAW_KEY]) == {"net.weight", "net.bias"}
    torch.testing.assert_close(ckpt["state_dict"]["frozen.weight"], frozen0, rtol=0, atol=0)
    # what sample.py does: the plain Lightning load gets the EMA weights
    loaded = TinyGenerator.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(loaded.net.weight.detach(), want[-1])


def test_ema_resume_is_exact(tmp_path):
    def run(max_epochs: int, ckpt_path=None, folder="a"):
        model, ema = TinyGenerator(), EMA(decay=0.7)
        # saved at epoch end, before train end: the checkpoint is written while the raw weights are in the module
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(tmp_path, [ema, checkpoint], max_steps=-1, max_epochs=max_epochs)
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, ema

    straight_model, straight = run(2, folder="straight")
    run(1, folder="first")
    resumed_model, resumed = run(2, ckpt_path=tmp_path / "first" / "last.ckpt", folder="resumed")
    assert resumed.num_updates == straight.num_updates == 8
    # the average (now in the modules) and the raw weights (now in the callbacks) match bit for bit
    for a, b in zip([*resumed._shadow, *resumed_model.parameters()], [*straight._shadow, *straight_model.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_videos_files_modes_and_tensorboard(tmp_path):
    model = TinyGenerator()
    sampler = SampleVideos(["a", "b"], every_n_steps=2, num_frames=3, seed=7, overrides={"num_inference_steps": 2})
    trainer = make_trainer(tmp_path, [sampler])
    trainer.fit(model, loader())

    # samples at steps 2 and 4; the train-end call sees step 4 already done
    assert [c["seed"] for c in model.generate_calls] == [7, 7]
    for call in model.generate_calls:
        assert not call["training"] and not call["frozen_training"] and not call["grad"]
        assert call["num_frames"] == 3 and call["overrides"] == {"num_inference_steps": 2}
    # every submodule's mode is restored: training steps after a sample look like the ones before
    assert model.step_modes == [(True, False)] * 4
    root = Path(trainer.log_dir) / "samples"
    assert (root / "prompts.txt").read_text() == "00\ta\n01\tb\n"
    for step in (2, 4):
        folder = root / f"step_{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == ["00.mp4", "01.mp4", "grid.png"]
        video = read_video(folder / "01.mp4")
        assert tuple(video.shape) == (3, 16, 16, 3)
    # the mp4 holds what generate returned (same seed, the weights after step 4), up to H.264 rounding
    frames = model.generate(["a", "b"], num_frames=3, seed=7)
    assert (read_video(root / "step_000004" / "00.mp4").float() - frames[0].float()).abs().mean() < 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    assert [e.step for e in events.Images("samples/grid")] == [2, 4]
    # each video as an animated GIF (TensorBoard's video display): one frame per generated frame
    gifs = events.Images("samples/01")
    assert [e.step for e in gifs] == [2, 4]
    gif = Image.open(io.BytesIO(gifs[-1].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == (16, 16)


def test_sample_videos_uses_ema_whatever_the_callback_order(tmp_path):
    model = TinyGenerator()
    w0 = model.net.weight.detach().clone()
    raw = RawWeights()
    # SampleVideos before EMA: it must bring the average up to date for the step itself
    callbacks = [raw, SampleVideos(["a"], every_n_steps=2, num_frames=2, at_train_end=False), EMA(decay=0.5)]
    trainer = make_trainer(tmp_path, callbacks, logger=False)
    trainer.fit(model, loader())
    want = expected_ema(w0, raw.weights, decay=0.5)
    assert len(model.generate_calls) == 2
    torch.testing.assert_close(model.generate_calls[0]["weight"], want[1])
    torch.testing.assert_close(model.generate_calls[1]["weight"], want[3])
    assert not torch.allclose(want[1], raw.weights[1])
    assert (tmp_path / "samples" / "step_000004" / "grid.png").is_file()  # no logger: default_root_dir/samples
    # sampling swapped the average back out: training followed exactly the path it takes without these callbacks
    reference, reference_raw = TinyGenerator(), RawWeights()
    make_trainer(tmp_path, [reference_raw], logger=False).fit(reference, loader())
    for a, b in zip(raw.weights, reference_raw.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callbacks_configs_compose_and_instantiate(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        overrides = [f"+paths.output_dir={tmp_path}", "callbacks.sample_videos.every_n_steps=5"]
        cfg = compose(overrides=["+callbacks=[default,ema]", *overrides])
        none = compose(overrides=["+callbacks=none"])
    assert set(cfg.callbacks) == {"model_checkpoint", "on_exception_checkpoint", "rich_progress_bar", "lr_monitor",
                                  "sample_videos", "ema", "finite_guard", "exact_resume", "data_skips"}
    built = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    assert isinstance(built["ema"], EMA) and built["ema"].decay == 0.9999
    assert isinstance(built["sample_videos"], SampleVideos) and built["sample_videos"].every_n_steps == 5
    assert built["sample_videos"].dirpath == f"{tmp_path}/samples"
    assert isinstance(built["model_checkpoint"], ModelCheckpoint) and built["model_checkpoint"].save_last
    assert built["model_checkpoint"].dirpath == f"{tmp_path}/checkpoints"
    assert isinstance(built["on_exception_checkpoint"], InterruptCheckpoint)
    assert isinstance(built["finite_guard"], NonFiniteGuard) and isinstance(built["exact_resume"], ExactResume)
    assert isinstance(built["data_skips"], DataSkips)
    assert built["on_exception_checkpoint"].dirpath == f"{tmp_path}/checkpoints"
    assert isinstance(built["rich_progress_bar"], RichProgressBar)
    assert isinstance(built["lr_monitor"], LearningRateMonitor)
    assert not none.get("callbacks")
