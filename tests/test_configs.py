"""Every config composes (every experiment with every data config, down to a batch), and the paper-size model
builds (on the meta device) with the expected sizes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.synthetic import SyntheticDataModule
from modules.base import validate_model_config
from modules.lavie import PretrainedConfigError
from datamodules.video_io import write_video
from tests.dataset_layouts import (
    looping_frames,
    write_avi,
    write_image_captions,
    write_msrvtt,
    write_ucf101,
    write_video_text,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=True)


# experiments also used by sample.py (they override only the model group; paper recipes sample with model=...)
SAMPLE_EXPERIMENTS = ["tiny_lavie", "tiny_lavie_interpolation"]


@pytest.mark.parametrize(("entry", "experiment"),
                         [("train", e) for e in EXPERIMENTS] + [("sample", e) for e in SAMPLE_EXPERIMENTS])
def test_experiments_compose(entry, experiment):
    cfg = compose_config(entry, f"experiment={experiment}")
    # the module of each recipe family, the most specific name first
    families = [("loong_tokenizer", "modules.loong_tokenizer"), ("lavie_interpolation", "modules.lavie_interpolation"),
                ("lavie_vsr", "modules.lavie_vsr"), ("lavie_lora", "modules.lavie_lora"),
                ("lavie_long", "modules.lavie_long"), ("vidrd_vae", "modules.vidrd_vae"), ("vidrd", "modules.vidrd"),
                ("loong", "modules.loong"), ("lavie", "modules.lavie")]
    expected = next(module for name, module in families if name in experiment)
    assert cfg.model._target_.rsplit(".", 1)[0] == expected
    if entry == "train":
        assert cfg.data._target_.startswith("datamodules.") and cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_paper_size_lavie_builds_on_meta_device():
    cfg = compose_config("train", "model=lavie_base", "model.pretrained.init_from_sd=false")
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # SD 1.4 UNet (859.5M) + LaVie's temporal layers; CLIP ViT-L/14 text tower; SD's VAE
    assert 905e6 < count(model.unet) < 912e6
    assert 122e6 < count(model.text_encoder) < 124e6
    assert 83e6 < count(model.autoencoder) < 84e6
    assert sum(1 for k in model.unet.state_dict() if model.unet.is_temporal_key(k)) == 144
    assert model.autoencoder.downsample_factor == 8 and model.autoencoder.latent_channels == 4
    # only the UNet trains at paper size
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


def test_paper_size_config_refuses_to_build_without_stable_diffusion():
    cfg = compose_config("train", "model=lavie_base")
    with pytest.raises(PretrainedConfigError, match="model.pretrained.sd_path"):
        validate_model_config(cfg.model)


# ----------------------------------------------------------------------------- every experiment x every dataset

# data=video_tokens reads shards scripts/pretokenize.py makes from one of the others: tests/test_video_tokens.py
DATA_CONFIGS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml") if p.stem != "video_tokens")
# what each recipe asks of any dataset: clip length and images appended per clip (None: the data config's own)
RECIPES = {
    "lavie_base": (16, 4), "loong_tokenizer_images": (1, None), "loong_tokenizer_17": (17, None),
    "loong_tokenizer_65": (65, None), "tiny_lavie": (8, 4), "tiny_loong_tokenizer": (1, None),
    "tiny_loong_tokenizer_17": (17, None), "tiny_loong_tokenizer_65": (65, None),
    "tiny_loong": (1, 0), "tiny_loong_17": (17, 4), "tiny_loong_65": (65, 4),
    "tiny_lavie_interpolation": (13, 0),
    "tiny_lavie_vsr": (8, 0),
    "tiny_lavie_lora": (1, 0),
    "tiny_lavie_long": (8, 0),
    "tiny_vidrd": (8, 4), "tiny_vidrd_vae_2d": (1, None), "tiny_vidrd_vae": (8, None),
}
OWN_IMAGES_PER_VIDEO = {"joint": 4}  # data configs whose default is not 0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Every data config's default location under one folder (paths.data_dir), 65-frame videos: the longest clip
    any recipe asks for (lavie_base's 16 frames 3 apart span 46)."""
    root = tmp_path_factory.mktemp("data")
    write_video_text(root / "video_text", num_videos=2, num_frames=65, size=(16, 16))
    write_image_captions(root / "images", num_images=3, size=(16, 16))
    ucf = write_ucf101(root / "UCF101", classes=["Archery"], num_frames=2, size=(16, 16))
    msrvtt = write_msrvtt(root / "MSRVTT", video_ids=(7010,), train_ids=(0, 1), num_frames=2, size=(16, 16))
    # the official-layout writers' frames stop at 30: the same files again, 65 frames long
    for relative in ucf.videos:
        write_avi(ucf.root / "UCF-101" / relative, looping_frames(65))
    for video_id in msrvtt.captions:
        write_video(msrvtt.root / "videos" / "all" / f"{video_id}.mp4", looping_frames(65))
    return root


def compose_recipe(experiment: str, data: str, data_dir: Path, *overrides: str):
    # batches shrunk to one item of 16x16 read in this process; everything else as the recipe says
    return compose_config("train", f"experiment={experiment}", f"data={data}", f"paths.data_dir={data_dir}",
                          "data.resolution=[16,16]", "data.batch_size=1", "data.num_workers=0", *overrides)


def instantiation_error(node) -> BaseException:
    """The error behind Hydra's InstantiationException (what train.py reports, with exit code 2, for user errors)."""
    with pytest.raises(InstantiationException) as error:
        instantiate(node, _convert_="all")
    return error.value.__cause__


def draw_batch(cfg) -> dict:
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.usefixtures("single_thread")  # tiny tensors; the 2 cores are shared
@pytest.mark.parametrize("data", DATA_CONFIGS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_data_config(experiment, data, data_dir):
    frames, images_per_video = RECIPES[experiment]
    images_per_video = OWN_IMAGES_PER_VIDEO.get(data, 0) if images_per_video is None else images_per_video
    overrides = ([] if data in ("synthetic", "images", "joint", "image_folder")
                 else [f"data.image_manifest={data_dir}/images/train.csv"])
    if data == "image_folder":
        overrides += [f"data.folder={data_dir}/images", "data.caption=an image"]
    cfg = compose_recipe(experiment, data, data_dir, *overrides)
    if data in ("images", "image_folder") and (frames, images_per_video) != (1, 0):
        # an image dataset cannot give the recipe's clips or joint mode: it says so rather than train something else
        error = instantiation_error(cfg.data)
        assert isinstance(error, ValueError) and re.search(r"data\.num_frames=1|data\.images_per_video=0", str(error))
        return
    batch = draw_batch(cfg)
    assert batch["video"].shape == (1, frames + images_per_video, 3, 16, 16)
    assert len(batch.get("image_captions", [[]])[0]) == images_per_video


@pytest.mark.usefixtures("single_thread")  # tiny tensors; the 2 cores are shared
@pytest.mark.parametrize("data", ["video_text", "ucf101", "msrvtt"])
def test_a_joint_recipe_on_videos_alone_asks_for_images(data, data_dir):
    error = instantiation_error(compose_recipe("tiny_lavie", data, data_dir).data)
    assert isinstance(error, ValueError)
    assert re.search(r"images_per_video=4 .*needs image_manifest.*data\.images_per_video=0", str(error))
    cfg = compose_recipe("tiny_lavie", data, data_dir, "data.images_per_video=0")
    assert draw_batch(cfg)["video"].shape == (1, 8, 3, 16, 16)


# The synthetic data of the tiny recipes, as the measured results in docs/ were trained on (data=synthetic, the
# default): every setting that reaches SyntheticDataModule.
TINY_SYNTHETIC = {
    "tiny_lavie": dict(num_frames=8, resolution=[32, 32], train_size=20000, val_size=16, batch_size=4,
                       num_workers=0, seed=0, images_per_video=4, image_mode=False),
    "tiny_lavie_interpolation": dict(num_frames=13, resolution=[32, 32], train_size=20000, val_size=16,
                                     batch_size=4, num_workers=0, seed=0, images_per_video=0, image_mode=False),
    "tiny_lavie_vsr": dict(num_frames=8, resolution=[128, 128], train_size=20000, val_size=8, batch_size=2,
                           num_workers=0, seed=0, images_per_video=0, image_mode=False),
    "tiny_lavie_long": dict(num_frames=8, resolution=[32, 32], train_size=20000, val_size=16, batch_size=4,
                            num_workers=0, seed=0, images_per_video=0, image_mode=False),
    "tiny_loong_tokenizer": dict(num_frames=1, resolution=[32, 32], train_size=100000, val_size=32, batch_size=32,
                                 num_workers=0, seed=0, images_per_video=0, image_mode=True),
    "tiny_loong_tokenizer_17": dict(num_frames=17, resolution=[32, 32], train_size=100000, val_size=32,
                                    batch_size=4, num_workers=0, seed=0, images_per_video=0, image_mode=False),
    "tiny_loong_tokenizer_65": dict(num_frames=65, resolution=[32, 32], train_size=100000, val_size=32,
                                    batch_size=1, num_workers=0, seed=0, images_per_video=0, image_mode=False),
}


@pytest.mark.usefixtures("single_thread")  # tiny tensors; the 2 cores are shared
@pytest.mark.parametrize("selected", [(), ("data=synthetic",)], ids=["default", "data=synthetic"])
@pytest.mark.parametrize("experiment", sorted(TINY_SYNTHETIC))
def test_tiny_recipes_keep_their_synthetic_data(experiment, selected):
    datamodule = instantiate(compose_config("train", f"experiment={experiment}", *selected).data, _convert_="all")
    assert isinstance(datamodule, SyntheticDataModule)
    settings = {key: datamodule.hparams[key] for key in TINY_SYNTHETIC[experiment]}
    assert settings == TINY_SYNTHETIC[experiment]
    assert datamodule.sizes == {"train": settings["train_size"], "val": settings["val_size"]}
    assert datamodule.image_mode is settings["image_mode"]


def test_a_command_line_size_still_wins_over_the_recipe():
    cfg = compose_config("train", "experiment=tiny_lavie", "data.train_size=8", "data.val_size=2")
    assert (cfg.data.train_size, cfg.data.val_size) == (8, 2)


@pytest.mark.parametrize("experiment", ["tiny_lavie", "tiny_loong", "tiny_loong_65"])
def test_evaluation_writes_to_its_own_folder_whatever_the_recipe(experiment):
    """A staged recipe fixes hydra.run.dir to its training folder (logs/train/<task>/<stage>); evaluating it must not
    write videos into that folder, and the same protocol and run_name must name the same folder (resume)."""
    def run_dir(entry: str) -> str:  # unresolved: ${hydra:...} resolves only inside a running Hydra app
        return OmegaConf.to_container(compose_config(entry, f"experiment={experiment}").hydra.run)["dir"]

    assert run_dir("evaluate") == "${paths.log_dir}/eval/${hydra:runtime.choices.eval}/${run_name}"
    assert run_dir("sample") == "${paths.log_dir}/${task_name}/${now:%Y-%m-%d_%H-%M-%S}"
