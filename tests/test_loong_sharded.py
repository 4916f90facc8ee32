"""Sharded training (`trainer=fsdp`): FSDP2 per Loong decoder layer with activation checkpointing, under Lightning's
ModelParallelStrategy (modules/components/sharding.py, `Loong.configure_model`).

One real train.py run on 2 CPU processes (gloo) covers the whole path. A probe callback (`ShardingProbe`, below; the
run imports it through `+callbacks.probe`) records on each rank what the sharding did, the rank's step-0 batch and
loss, the full initial weights and the full step-0 gradient after FSDP's reduction; the tests compare these with
the unsharded model in this process. The rest runs in this process, on a one-rank gloo group.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from callbacks.ema import EMA
from modules.components.sharding import FSDP2Strategy, activation_checkpointing_of, is_checkpointed, is_sharded
from modules.loong import Loong
from tests.test_loong_model import SMALL, batch_of, save_tokenizer
from utils.generators import load_training_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a dark background"
WORLD = 2


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it in the same order), a tensor as it is."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class ShardingProbe(Callback):
    """Inside the sharded run: what each rank's decoder and tokenizer look like, its step-0 batch and loss, the
    initial weights and the reduced step-0 gradients, written to `<out>/rank<r>.pt` when training ends."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict[str, Any] = {"losses": []}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        decoder, tokenizer = pl_module.decoder, pl_module.tokenizer
        rest = (decoder.embed_tokens, decoder.norm, decoder.lm_head)  # the root group's own weights
        layers = []
        for layer in decoder.layers:
            params = list(layer.parameters())
            layers.append({
                "sharded": is_sharded(layer), "checkpointed": is_checkpointed(layer),
                "dtensors": all(isinstance(p, DTensor) for p in params),
                "placements": sorted({str(p.placements) for p in params if isinstance(p, DTensor)}),
                "mesh_sizes": sorted({p.device_mesh.size() for p in params if isinstance(p, DTensor)}),
                "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                "numel": sum(p.numel() for p in params),
            })
        self.record.update(
            rank=trainer.global_rank, world_size=trainer.world_size, strategy=type(trainer.strategy).__name__,
            layers=layers, root_sharded=is_sharded(decoder),
            root_dtensors=[isinstance(m.weight, DTensor) for m in rest],
            tokenizer={"dtensors": any(isinstance(p, DTensor) for p in tokenizer.parameters()),
                       "trains": any(p.requires_grad for p in tokenizer.parameters()), "training": tokenizer.training},
            initial={name: full(value) for name, value in decoder.state_dict().items()},
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0:
            self.record["batch"] = {"video": batch["video"].clone(), "caption": list(batch["caption"])}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 0:  # before clipping: the gradients as FSDP reduced them
            self.record["grads"] = {n: full(p.grad) for n, p in pl_module.decoder.named_parameters()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        self.record["losses"].append(float(outputs["loss"]))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    root = tmp_path_factory.mktemp("loong_sharded")
    files = types.SimpleNamespace(root=root, tokenizer=save_tokenizer(root / "tokenizer.ckpt"),
                                  cache=root / "text_tokenizers")
    # the text tokenizer trained once, here, so the run's two ranks read it from the cache instead of both training it
    _ = tiny_loong(files).text_tokenizer.tokenizer
    return files


def model_overrides(files) -> list[str]:
    return ["experiment=tiny_loong", f"model.tokenizer_checkpoint={files.tokenizer}",
            f"model.text_tokenizer.cache_dir={files.cache}", *SMALL,
            "model.text_drop=0"]  # no random caption drop: a step's loss is a function of its batch and weights


def tiny_loong(files, *overrides: str) -> Loong:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*model_overrides(files), "paths.root_dir=.", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model, _convert_="all")


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo group and ModelParallelStrategy's 2-D mesh over it, as Lightning builds it."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def train_command(files, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, "train.py", *model_overrides(files), "trainer=fsdp", "trainer.accelerator=cpu",
         "data.train_size=16", "data.val_size=2", "data.batch_size=4", "trainer.log_every_n_steps=1",
         f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sharded_run(files) -> types.SimpleNamespace:
    run_dir, probe = files.root / "run", files.root / "probe"
    result = train_command(files, run_dir, f"trainer.devices={WORLD}", "trainer.max_steps=3",
                           "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
                           "callbacks.model_checkpoint.save_top_k=-1",
                           f"+callbacks.probe._target_={__name__}.ShardingProbe", f"+callbacks.probe.out={probe}")
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return types.SimpleNamespace(dir=run_dir, ranks=ranks, checkpoint=run_dir / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------------------------------- the 2-process run
def test_every_decoder_layer_is_sharded_over_both_ranks_and_checkpointed(sharded_run):
    for rank, record in enumerate(sharded_run.ranks):
        assert (record["rank"], record["world_size"], record["strategy"]) == (rank, WORLD, "FSDP2Strategy")
        assert record["root_sharded"] and record["root_dtensors"] == [True, True, True]
        assert len(record["layers"]) == 2
        for layer in record["layers"]:
            assert layer["sharded"] and layer["checkpointed"] and layer["dtensors"]
            assert layer["placements"] == [str((Shard(0),))] and layer["mesh_sizes"] == [WORLD]
            assert layer["local_numel"] * WORLD == layer["numel"]  # each rank holds half of every layer
        # the frozen video tokenizer: whole on every rank, no gradient, eval mode
        assert record["tokenizer"] == {"dtensors": False, "trains": False, "training": False}


def test_losses_are_finite_and_the_step0_loss_is_the_unsharded_one(sharded_run, files):
    unsharded = tiny_loong(files).train()
    unsharded.decoder.load_state_dict(sharded_run.ranks[0]["initial"])
    for record in sharded_run.ranks:
        assert len(record["losses"]) == 3 and all(torch.isfinite(torch.tensor(record["losses"])))
        loss = unsharded.losses(record["batch"])["loss"]
        assert loss.item() == pytest.approx(record["losses"][0], rel=1e-6)
    assert sharded_run.ranks[0]["batch"]["caption"] != sharded_run.ranks[1]["batch"]["caption"]  # data split by rank
    rows = list(csv.DictReader(next((sharded_run.dir / "csv").rglob("metrics.csv")).open()))
    assert [math.isfinite(float(r["val/loss"])) for r in rows if r.get("val/loss")] == [True]  # validation ran too


def test_step0_gradients_are_the_unsharded_gradients_of_both_ranks_batches(sharded_run, files):
    """FSDP reduce-scatters the gradients: every rank's full gradient is that of the mean of the ranks' losses."""
    unsharded = tiny_loong(files).train()
    unsharded.decoder.load_state_dict(sharded_run.ranks[0]["initial"])
    loss = sum(unsharded.losses(record["batch"])["loss"] for record in sharded_run.ranks) / WORLD
    loss.backward()
    for record in sharded_run.ranks:
        assert record["grads"].keys() == dict(unsharded.decoder.named_parameters()).keys()
        for name, param in unsharded.decoder.named_parameters():
            torch.testing.assert_close(record["grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_sample_videos_run_on_every_rank_and_rank0_writes_them(sharded_run):
    """SampleVideos at the end of training: a sharded decoder needs every rank in each forward, so every rank
    generates (a rank-0-only call would hang or break the process group) and rank 0 writes the files."""
    folders = sorted((sharded_run.dir / "samples").glob("step_*"))
    assert folders and sorted(p.name for p in folders[-1].glob("*.mp4")) == ["00.mp4", "01.mp4", "02.mp4", "03.mp4"]


def test_the_checkpoint_is_an_ordinary_one_that_samples(sharded_run, files):
    checkpoint = torch.load(sharded_run.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    model = tiny_loong(files)
    expected = model.state_dict()
    state = checkpoint["state_dict"]
    assert list(state) == list(expected)  # one file, the unsharded names, no shard folder
    assert all(type(v) is torch.Tensor and v.shape == expected[k].shape for k, v in state.items())
    load_training_checkpoint(model, sharded_run.checkpoint)  # what sample.py and eval/ do
    assert not torch.equal(model.decoder.lm_head.weight, sharded_run.ranks[0]["initial"]["lm_head.weight"])  # trained
    video = model.eval().generate([PROMPT], num_frames=1, seed=0)
    assert video.shape == (1, 1, 32, 32, 3) and video.dtype == torch.uint8


def test_resuming_a_sharded_run_continues_it_exactly(sharded_run, files):
    """Step 3 again, from the step-2 checkpoint (weights and AdamW states gathered into one file, scattered back)."""
    resumed = files.root / "resumed"
    result = train_command(files, resumed, f"trainer.devices={WORLD}", "trainer.max_steps=3",
                           f"ckpt_path={sharded_run.dir / 'checkpoints' / 'step_000002.ckpt'}")
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    want = torch.load(sharded_run.checkpoint, map_location="cpu", weights_only=True)
    got = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == 3
    torch.testing.assert_close(got["state_dict"], want["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(got["optimizer_states"], want["optimizer_states"], rtol=0, atol=0)


def test_ema_refuses_the_sharded_strategy_before_training(files, tmp_path):
    result = train_command(files, tmp_path / "run", "trainer.devices=1", "trainer.max_steps=1",
                           "callbacks=[default,ema]")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the EMA callback does not support FSDP2Strategy" in result.stderr and "~callbacks.ema" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- in this process
def test_configure_model_shards_in_place_and_changes_no_number(files, mesh):
    model = tiny_loong(files).train()
    reference = copy.deepcopy(model)
    model._device_mesh = mesh
    model.configure_model()
    model.configure_model()  # called again (a second fit): left as it is
    assert is_sharded(model.decoder) and all(is_sharded(layer) and is_checkpointed(layer)
                                             for layer in model.decoder.layers)
    assert all(isinstance(p, DTensor) for p in model.decoder.parameters())
    assert not any(isinstance(p, DTensor) for p in model.tokenizer.parameters())
    assert list(model.state_dict()) == list(reference.state_dict())  # names unchanged (no wrapper module)

    # activation checkpointing runs each layer's forward again in backward (a pre-hook: the recomputation stops as
    # soon as it has what backward needs, before the layer's end)
    calls = []
    model.decoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = batch_of(frames=1, batch=4)
    loss = model.losses(batch)["loss"]
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2
    expected = reference.losses(batch)["loss"]
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), q in zip(model.decoder.named_parameters(), reference.decoder.parameters()):
        torch.testing.assert_close(full(p.grad), q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_activation_checkpointing_follows_the_strategy(files, mesh):
    assert activation_checkpointing_of(None) and activation_checkpointing_of(FSDP2Strategy())
    assert not activation_checkpointing_of(FSDP2Strategy(activation_checkpointing=False))
    model = tiny_loong(files)
    model._device_mesh = mesh
    model._trainer = types.SimpleNamespace(strategy=FSDP2Strategy(activation_checkpointing=False))
    model.configure_model()
    assert all(is_sharded(layer) and not is_checkpointed(layer) for layer in model.decoder.layers)
    calls = []
    model.decoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train().losses(batch_of(frames=1, batch=2))["loss"].backward()
    assert len(calls) == 1  # nothing recomputed


def test_without_a_device_mesh_nothing_changes(files):
    model = tiny_loong(files)
    model.configure_model()  # one device, DDP: Lightning gives no mesh
    assert not any(is_sharded(m) or is_checkpointed(m) for m in model.modules())


def test_a_trainable_weight_outside_the_decoder_is_refused(files, mesh):
    model = tiny_loong(files)
    model.tokenizer.quantizer.requires_grad_(True)
    model._device_mesh = mesh
    with pytest.raises(ValueError, match=r"outside it train too: \['tokenizer\.quantizer"):
        model.configure_model()


def test_the_fsdp_trainer_config():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp", "paths.root_dir=."])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.activation_checkpointing
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("all", 1)
    assert strategy._save_distributed_checkpoint is False  # one .ckpt file, what sample.py reads
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        FSDP2Strategy(tensor_parallel_size=2)


def test_ema_refuses_sharded_strategies_only():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="does not support FSDP2Strategy.*drop it from the callbacks"):
        EMA().setup(types.SimpleNamespace(strategy=FSDP2Strategy()), module, "fit")
    EMA().setup(types.SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), module, "fit")
