"""VidRD's video UNet: how far it is from the official numbers, how big it is, how fast the CPU-sized one runs.

* `parity`: max abs difference to the official outputs in `$FIXTURES_DIR/vidrd` (README), float32 and float64, for
  Temp-Conv (`temporal_conv_unet`), the Temp-Attn sub-block of each width and frame count (`temporal_attn_c{C}`,
  `attn_out` and `block_out`) and a whole transformer block (`block_c128`), with our own frame embedding; for the
  sub-block in float64 also with the stored official one (`..._fp64_official_embedding`): the official sinusoid is
  computed in float32 and a few of its values differ from ours by one float32 ulp (~5e-7), which `block_out` carries.
* `paper_size`: `configs/model/vidrd_unet/sd21_base.yaml` built on the meta device (no memory): keys, parameters,
  temporal parameters (Temp-Conv, Temp-Attn), build seconds.
* `tiny`: `configs/model/vidrd_unet/tiny.yaml`: parameters, and the median of `--repeats` forward (no grad) and
  forward + backward passes on one 8-frame 8x8 latent clip, one CPU thread, float32.

    .venv/bin/python benchmarks/vidrd_unet.py   # writes benchmarks/results/vidrd_unet_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from modules.components import video_unet
from modules.components.temporal_conv import TemporalConvLayer
from modules.components.video_unet import VIDRD_DESIGN, SpatioTemporalBlock

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "model" / "vidrd_unet"


def files(root: Path, stem: str) -> tuple[dict, dict, dict]:
    return tuple(load_file(str(root / f"{stem}_{part}.safetensors")) for part in ("weights", "io_fp32", "out_fp64"))


def miss(ours: torch.Tensor, official: torch.Tensor) -> float:
    return (ours.double() - official.double()).abs().max().item()


def block_for(weights: dict, channels: int, heads: int, cross: int, dtype: torch.dtype) -> SpatioTemporalBlock:
    spatial = BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim=cross, activation_fn="geglu")
    block = SpatioTemporalBlock(spatial, design=VIDRD_DESIGN).to(dtype).eval()
    block.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    return block


@torch.no_grad()
def parity(root: Path) -> dict[str, float]:
    result = {}
    dtypes = {"fp32": torch.float32, "fp64": torch.float64}
    weights, io, out64 = files(root, "temporal_conv_unet")
    layers = sum(1 for k, v in weights.items() if v.ndim == 5 and k.endswith("weight"))
    for name, dtype in dtypes.items():
        layer = TemporalConvLayer(weights["convs.0.weight"].shape[0], num_layers=layers).to(dtype).eval()
        layer.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
        result[f"temporal_conv_unet_{name}"] = miss(layer(io["x"].to(dtype)), (io if name == "fp32" else out64)["out"])
    for path in sorted(root.glob("temporal_attn_c*_weights.safetensors")):
        stem = path.name.removesuffix("_weights.safetensors")
        weights, io, out64 = files(root, stem)
        channels = weights["temp_norm.weight"].shape[0]
        heads = next(v for k, v in io.items() if k.startswith("attn_probs")).shape[1]
        for name, dtype in dtypes.items():
            block = block_for(weights, channels, heads, 32, dtype)
            reference = io if name == "fp32" else out64
            for key in sorted(k for k in reference if k.startswith("block_out_f") and k != "block_out_f1"):
                frames = int(key.removeprefix("block_out_f"))
                seen = {}
                hook = block.temp_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o))
                out = block.temporal_residual(io[f"h_f{frames}"].to(dtype), frames, frames)
                hook.remove()
                result[f"{stem}_f{frames}_block_out_{name}"] = miss(out, reference[key])
                result[f"{stem}_f{frames}_attn_out_{name}"] = miss(seen["attn"], reference[f"attn_out_f{frames}"])
                if dtype == torch.float64:  # again with the official float32 sinusoid (stored) in place of ours
                    official = io[f"pos_emb_f{frames}"]
                    original, video_unet.frame_position_encoding = video_unet.frame_position_encoding, (
                        lambda f, d, device, dt: official.to(device, dt))
                    try:
                        out = block.temporal_residual(io[f"h_f{frames}"].to(dtype), frames, frames)
                    finally:
                        video_unet.frame_position_encoding = original
                    result[f"{stem}_f{frames}_block_out_fp64_official_embedding"] = miss(out, reference[key])
    weights, io, out64 = files(root, "block_c128")
    channels, cross = weights["norm1.weight"].shape[0], weights["attn2.to_k.weight"].shape[1]
    for name, dtype in dtypes.items():
        block = block_for(weights, channels, channels // 64, cross, dtype)
        h, text = io["h"].to(dtype), io["encoder_hidden_states"].to(dtype)
        frames = h.shape[0] // text.shape[0]
        out = block(h, encoder_hidden_states=text.repeat_interleave(frames, 0),
                    cross_attention_kwargs={"video_frames": frames, "total_frames": frames})
        result[f"block_c128_{name}"] = miss(out, (io if name == "fp32" else out64)["out"])
    return result


def paper_size() -> dict:
    start = time.perf_counter()
    with torch.device("meta"):
        unet = instantiate(OmegaConf.load(CONFIGS / "sd21_base.yaml"))
    seconds = time.perf_counter() - start
    state = unet.state_dict()
    count = lambda keep: sum(v.numel() for k, v in state.items() if keep(k))  # noqa: E731
    return {"keys": len(state), "parameters": count(lambda k: True),
            "temporal_keys": sum(1 for k in state if unet.is_temporal_key(k)),
            "temporal_parameters": count(unet.is_temporal_key),
            "temp_conv_parameters": count(lambda k: ".temp_convs." in k),
            "temp_attn_parameters": count(lambda k: ".temp_attn." in k or ".temp_norm." in k),
            "meta_build_seconds": round(seconds, 2)}


def tiny(repeats: int) -> dict:
    torch.manual_seed(0)
    unet = instantiate(OmegaConf.load(CONFIGS / "tiny.yaml"))
    sample, text = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 7, unet.config.cross_attention_dim)

    def forward() -> None:
        with torch.no_grad():
            unet(sample, 500, text)

    def train_step() -> None:
        unet.zero_grad()
        unet(sample, 500, text).square().mean().backward()

    timings = {}
    for name, fn in (("forward_ms", forward), ("forward_backward_ms", train_step)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        timings[name] = round(statistics.median(times), 1)
    return {"parameters": sum(p.numel() for p in unet.parameters()),
            "temporal_parameters": sum(p.numel() for p in unet.temporal_parameters()),
            "input": "1 x 4 x 8 frames x 8 x 8, 1 thread, float32", **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path,
                        default=Path(os.environ.get("FIXTURES_DIR", REPO.parent / "shared" / "fixtures")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vidrd_unet_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"parity_max_abs": parity(args.fixtures / "vidrd"), "paper_size": paper_size(),
              "tiny": tiny(args.repeats), "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
