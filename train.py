"""Train a text-to-video backbone.

    python train.py experiment=tiny_lavie                       # CPU-sized LaVie on the synthetic dataset
    python train.py model=lavie_base model.pretrained.sd_path=DIR
    python train.py experiment=tiny_lavie ckpt_path=RUN/checkpoints/last.ckpt   # resume

Everything (data, model, callbacks, loggers, trainer) comes from `configs/`; nothing here is model-specific.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from modules.base import validate_model_config
from utils.cli import instantiate_group, user_errors_exit

log = logging.getLogger("t2v")

# With OnExceptionCheckpoint configured, Lightning resumes ckpt_path=None from the run directory's last or
# interrupted checkpoint (none in a fresh run directory) and warns about it each time: expected, not news.
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*ckpt_path=\"last\"\) is set, but there is no last checkpoint")
# Lightning only knows the DataLoader state_dict protocol; our datamodules resume the data position themselves
# (datamodules/resumable.py, restored through the datamodule's checkpoint state), so this warning is wrong here.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")


def train(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path to resume from does not exist: {cfg.ckpt_path}")

    validate_model_config(cfg.model)  # fail fast, before a paper-size model is built
    log.info("data: %s", cfg.data._target_)
    # plain lists and dicts, not OmegaConf containers: checkpoints must load with torch.load(weights_only=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    log.info("model: %s", cfg.model._target_)
    model = instantiate(cfg.model, _convert_="all")
    trainer = instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger")) or False
    )
    if trainer.is_global_zero:
        # the resolved config next to the checkpoints, so a run says exactly what it was
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    log.info("run directory: %s", cfg.paths.output_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
