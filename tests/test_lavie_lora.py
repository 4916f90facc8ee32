"""LoRA personalisation of LaVie (modules/lavie_lora.py, modules/components/lora.py): only the spatial attention's
adapter trains, a LoRA file holds the adapter alone, loading it changes the samples (an untrained one does not),
bad files are refused by name, and the paper-size config builds on the meta device."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file, save_file

from datamodules.image_folder import ImageFolderDataModule
from modules.base import validate_model_config
from modules.components.lora import (
    METADATA_KEY,
    SPATIAL_ATTENTION_TARGETS,
    LoRAFileError,
    lora_parameters,
    read_lora,
)
from modules.components.video_unet import SpatioTemporalBlock, VideoUNet
from modules.lavie import PretrainedConfigError
from modules.lavie_lora import LaVieLoRA
from sample import sample
from tests.hydra_compose import compose_config
from train import train

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION = "a zorp on a dark background"
SAMPLING = {"num_inference_steps": 3, "num_frames": 4}


def model_config(tmp_path: Path, *overrides: str, name: str = "lavie_lora_tiny"):
    return compose_config("train", [f"model={name}", *overrides], tmp_path).model


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A random-weight tiny LaVie saved as train.py saves it (a Lightning checkpoint's state_dict)."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    base = instantiate(model_config(folder, name="lavie_tiny"), _convert_="all")
    for parameter in base.parameters():  # temporal output projections start at zero: give every layer an effect
        parameter.data.add_(0.02 * torch.randn_like(parameter))
    path = folder / "base.ckpt"
    torch.save({"state_dict": base.state_dict()}, path)
    return path


def lora_model(tmp_path: Path, base_checkpoint: Path, *overrides: str) -> LaVieLoRA:
    """LaVieLoRA from the tiny config; a constructor error is raised as itself (Hydra wraps it)."""
    try:
        return instantiate(model_config(tmp_path, f"model.base_checkpoint={base_checkpoint}", *overrides),
                           _convert_="all")
    except InstantiationException as error:
        raise error.__cause__ from None


def base_model(tmp_path: Path, base_checkpoint: Path):
    model = instantiate(model_config(tmp_path, name="lavie_tiny"), _convert_="all")
    model.load_state_dict(torch.load(base_checkpoint, weights_only=True)["state_dict"])
    return model


def image_batch(size: int = 4) -> dict:
    torch.manual_seed(1)
    return {"video": torch.rand(size, 1, 3, 32, 32) * 2 - 1, "caption": [CAPTION] * size, "is_image": torch.ones(size)}


def generate(model, seed: int = 3) -> torch.Tensor:
    return model.eval().generate([CAPTION, "a red circle moving left on a dark background"], seed=seed, **SAMPLING)


def nudge_lora(model: LaVieLoRA) -> None:
    """A stand-in for training: every adapter weight moved, so the adapter changes the UNet."""
    torch.manual_seed(5)
    with torch.no_grad():
        for _, parameter in lora_parameters(model):
            parameter.add_(0.3 * torch.randn_like(parameter))


# ----------------------------------------------------------------------------- what trains


def test_only_the_spatial_lora_trains_and_everything_else_stays(tmp_path, base_checkpoint):
    model = lora_model(tmp_path, base_checkpoint)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in lora_parameters(model)}
    assert trainable == adapter and adapter
    # every adapter sits on a spatial attention projection of a spatio-temporal block, none on a temporal layer
    blocks = [n for n, m in model.named_modules() if isinstance(m, SpatioTemporalBlock)]
    targets = "|".join(re.escape(t) for t in SPATIAL_ATTENTION_TARGETS)
    for name in adapter:
        assert re.fullmatch(rf"unet\..*\.({targets})\.lora_[AB]\.default\.weight", name), name
        assert any(name.startswith(b + ".") for b in blocks) and not VideoUNet.is_temporal_key(name[len("unet."):])
    # each target of each block got its adapter (A and B)
    assert len(adapter) == 2 * len(SPATIAL_ATTENTION_TARGETS) * len(blocks)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = model.configure_optimizers()
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for n, p in model.named_parameters() if n in adapter}
    model.train()
    for _ in range(3):  # B starts at zero, so A's gradient is zero until B has moved: step more than once
        optimizer.zero_grad()
        model.diffusion_loss(image_batch())["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    assert set(grads) == adapter
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapter
    assert any(model.unet.is_temporal_key(n[len("unet."):]) for n in before)  # temporal layers exist and stayed


# ----------------------------------------------------------------------------- the LoRA file


def test_the_lora_file_holds_the_adapter_alone_and_is_small(tmp_path, base_checkpoint):
    model = lora_model(tmp_path, base_checkpoint)
    path = model.save_lora(tmp_path / "lora.safetensors")
    state = load_file(path)
    assert set(state) == {n[len("unet."):].replace(".default.", ".") for n, _ in lora_parameters(model)}
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in state)
    adapter_bytes = sum(p.numel() * p.element_size() for _, p in lora_parameters(model))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < adapter_bytes + 64 * 1024  # the weights and a header, nothing of the base
    assert path.stat().st_size < 0.05 * base_checkpoint.stat().st_size and adapter_bytes < 0.05 * model_bytes
    _, config = read_lora(path)
    assert (config["r"], config["lora_alpha"]) == (model.lora["rank"], model.lora["alpha"])


def test_a_trained_lora_changes_the_samples_and_an_untrained_one_does_not(tmp_path, base_checkpoint):
    reference = generate(base_model(tmp_path, base_checkpoint))
    untrained = lora_model(tmp_path, base_checkpoint)
    assert torch.equal(generate(untrained), reference)  # peft starts B at zero: the adapter adds exactly nothing
    nudge_lora(untrained)
    trained_in_memory = generate(untrained)
    path = untrained.save_lora(tmp_path / "lora.safetensors")

    loaded = lora_model(tmp_path, base_checkpoint, f"model.lora.path={path}", "model.lora.rank=8")
    assert loaded.lora["rank"] == 8 and loaded.unet.peft_config["default"].r == 4  # the file's own rank wins
    videos = generate(loaded)
    assert torch.equal(videos, trained_in_memory)
    assert (videos.float() - reference.float()).abs().mean() > 1.0  # same seed, other videos


def test_lora_settings_are_config_values(tmp_path, base_checkpoint):
    model = lora_model(tmp_path, base_checkpoint, "model.lora.rank=2", "model.lora.alpha=8",
                       "model.lora.targets=[attn2.to_k,attn2.to_v]")
    adapter = dict(lora_parameters(model))
    assert adapter and all(re.search(r"\.attn2\.to_[kv]\.lora_[AB]\.", n) for n in adapter)
    assert all(min(p.shape) == 2 for p in adapter.values())
    layer = model.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    assert layer.scaling["default"] == 8 / 2


# ----------------------------------------------------------------------------- clear errors


def test_missing_corrupt_or_foreign_lora_files_are_named(tmp_path, base_checkpoint):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(LoRAFileError, match=re.escape(str(missing))):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={missing}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        validate_model_config(model_config(tmp_path, f"model.base_checkpoint={base_checkpoint}",
                                           f"model.lora.path={missing}"))

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoRAFileError, match=re.escape(str(corrupt))):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={corrupt}")

    good = lora_model(tmp_path, base_checkpoint)
    nudge_lora(good)
    source = good.save_lora(tmp_path / "good.safetensors")
    state, config = read_lora(source)
    metadata = {METADATA_KEY: json.dumps(config)}

    no_metadata = tmp_path / "no_metadata.safetensors"
    save_file(state, str(no_metadata))
    with pytest.raises(LoRAFileError, match=re.escape(str(no_metadata)) + ".*metadata"):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={no_metadata}")

    renamed = tmp_path / "renamed.safetensors"
    save_file({k.replace("attn1", "attnX"): v for k, v in state.items()}, str(renamed), metadata=metadata)
    with pytest.raises(LoRAFileError, match=re.escape(str(renamed)) + "(.|\n)*missing keys(.|\n)*unexpected keys"):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={renamed}")

    other_rank = tmp_path / "other_rank.safetensors"
    save_file({k: torch.cat([v, v], dim=0 if ".lora_A." in k else 1) for k, v in state.items()}, str(other_rank),
              metadata=metadata)
    with pytest.raises(LoRAFileError, match=re.escape(str(other_rank)) + "(.|\n)*shape mismatches"):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={other_rank}")

    with_base = tmp_path / "with_base.safetensors"
    save_file({**state, "conv_in.weight": torch.zeros(3)}, str(with_base), metadata=metadata)
    with pytest.raises(LoRAFileError, match=re.escape(str(with_base)) + ".*not LoRA adapter weights"):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={with_base}")

    with pytest.raises(LoRAFileError, match=re.escape(str(base_checkpoint)) + ".*not a LoRA file"):
        lora_model(tmp_path, base_checkpoint, f"model.lora.path={base_checkpoint}")


def test_bad_lora_settings_and_missing_base_weights_are_named(tmp_path, base_checkpoint):
    for override, key in [("model.lora.rank=0", "model.lora.rank"), ("model.lora.alpha=-1", "model.lora.alpha"),
                          ("model.lora.targets=[attn_temp.to_q]", "model.lora.targets"),
                          ("+model.lora.rnak=4", "model.lora setting")]:
        with pytest.raises(ValueError, match=re.escape(key)):
            validate_model_config(model_config(tmp_path, f"model.base_checkpoint={base_checkpoint}", override))
    with pytest.raises(ValueError, match="no layer 'attn1.to_z'"):
        lora_model(tmp_path, base_checkpoint, "model.lora.targets=[attn1.to_z]")
    with pytest.raises(PretrainedConfigError, match="model.base_checkpoint"):
        validate_model_config(model_config(tmp_path, "model.base_checkpoint=null"))
    with pytest.raises(PretrainedConfigError, match=re.escape(str(tmp_path / "absent.ckpt"))):
        validate_model_config(model_config(tmp_path, f"model.base_checkpoint={tmp_path / 'absent.ckpt'}"))


# ----------------------------------------------------------------------------- paper size


def test_paper_size_lora_builds_on_the_meta_device_and_counts_its_trainable_parameters(tmp_path):
    cfg = model_config(tmp_path, "model.pretrained.init_from_sd=false", name="lavie_lora")
    with torch.device("meta"):
        model = instantiate(cfg, _convert_="all")
    rank = cfg.lora.rank
    # rank * (in + out) per adapted projection: computed from the layers the adapter wraps
    expected = sum(rank * (m.base_layer.in_features + m.base_layer.out_features)
                   for n, m in model.unet.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
    blocks = sum(1 for m in model.unet.modules() if isinstance(m, SpatioTemporalBlock))
    assert sum(1 for m in model.unet.modules() if hasattr(m, "lora_A")) == blocks * len(SPATIAL_ATTENTION_TARGETS)
    assert model.num_trainable_parameters() == expected
    print(f"paper-size LaVie LoRA (rank {rank}): {expected:,} trainable parameters in {blocks} blocks, "
          f"of {sum(p.numel() for p in model.parameters()):,}")
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- data, training and sampling


def write_subject_pngs(folder: Path, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 36), (160, 60 + 40 * i, 220)).save(folder / f"im{i}.png")
    (folder / "notes.csv").write_text("not an image\n")


def test_image_folder_gives_captioned_one_frame_items(tmp_path):
    write_subject_pngs(tmp_path / "subject")
    (tmp_path / "subject" / "im2.txt").write_text("a zorp on a light background\n")
    datamodule = ImageFolderDataModule(tmp_path / "subject", caption=CAPTION, resolution=(32, 32), batch_size=3)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (3, 1, 3, 32, 32) and bool(batch["is_image"].all())
    assert sorted(batch["caption"]) == sorted([CAPTION, CAPTION, "a zorp on a light background"])
    with pytest.raises(ValueError, match="data.num_frames=1"):
        ImageFolderDataModule(tmp_path / "subject", caption=CAPTION, num_frames=8)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataModule(tmp_path / "absent", caption=CAPTION)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image in"):
        ImageFolderDataModule(tmp_path / "empty", caption=CAPTION)
    with pytest.raises(ValueError, match="data.caption"):
        ImageFolderDataModule(tmp_path / "subject", caption="")


def test_a_lora_run_checkpoints_the_adapter_and_sample_py_loads_it(tmp_path, base_checkpoint):
    write_subject_pngs(tmp_path / "subject")
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=tiny_lavie_lora", f"model.base_checkpoint={base_checkpoint}",
        f"image_folder.folder={tmp_path / 'subject'}", "trainer.max_steps=3", "data.batch_size=2",
        "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.sample_videos", "logger=none",
        "~callbacks.lr_monitor", "model.optimizer.lr=0.05",
    ]
    train(compose_config("train", overrides, run_dir))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    lora_file = run_dir / "lora.safetensors"
    assert lora_file.is_file()
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    assert {k[len("unet."):].replace(".default.", ".") for k in checkpoint["state_dict"]} == set(load_file(lora_file))
    assert checkpoint["lora_base_checkpoint"] == str(base_checkpoint)

    # the run's checkpoint and its lora.safetensors are the same adapter
    from_file = generate(lora_model(tmp_path, base_checkpoint, f"model.lora.path={lora_file}"))
    from_ckpt = generate(lora_model(tmp_path, base_checkpoint, f"model.lora.path={run_dir / 'checkpoints/last.ckpt'}"))
    assert torch.equal(from_file, from_ckpt)
    assert not torch.equal(from_file, generate(base_model(tmp_path, base_checkpoint)))

    # resuming the run reads its adapter-only checkpoint
    train(compose_config("train", [*overrides, f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}", "trainer.max_steps=4"],
                         tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "lora.safetensors").is_file()

    out = tmp_path / "samples"
    sample(compose_config("sample", ["model=lavie_lora_tiny", f"model.base_checkpoint={base_checkpoint}",
                                     f"model.lora.path={lora_file}", f"prompts=[{CAPTION}]",
                                     "model.sampler.num_inference_steps=2", "num_frames=4"], out))
    record = json.loads((out / "samples.json").read_text())
    assert len(record["videos"]) == 1 and (out / record["videos"][0]["file"]).is_file()

