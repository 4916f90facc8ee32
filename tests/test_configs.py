"""Every config composes, and the paper-size model builds (on the meta device) with the expected sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from modules.base import validate_model_config
from modules.lavie import PretrainedConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=True)


# experiments also used by sample.py (they override only the model group; paper recipes sample with model=...)
SAMPLE_EXPERIMENTS = ["tiny_lavie"]


@pytest.mark.parametrize(("entry", "experiment"),
                         [("train", e) for e in EXPERIMENTS] + [("sample", e) for e in SAMPLE_EXPERIMENTS])
def test_experiments_compose(entry, experiment):
    cfg = compose_config(entry, f"experiment={experiment}")
    expected = "modules.loong_tokenizer.LoongTokenizer" if "loong_tokenizer" in experiment else "modules.lavie.LaVie"
    assert cfg.model._target_ == expected
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
