"""Convert TGAN2's chainer C3D (UCF-101) to the project's C3D weight file.

    python scripts/convert_tgan2_c3d.py --weights conv3d_deepnetA_ucf.npz --mean mean2.npz \
        --out c3d_ucf101_tgan2.safetensors

Inputs are the two files of pfnet-research/tgan2's README ('Pre-trained weights', released at
github.com/mitmul/tgan2/releases): `conv3d_deepnetA_ucf.npz`, written by `chainer.serializers.save_npz` from
`C3DVersion1UCF101` (converted from the C3D v1.0 caffemodel `c3d_ucf101_finetune_whole_iter_20000`), and
`mean2.npz` whose `mean` array is the (3, 16, 128, 171) BGR per-pixel mean. TGAN2 loads the weights with
`npz.load_npz(path, model)` on the chain itself, so the arrays are named `<layer>/W` and `<layer>/b`
(`conv1a/W`, ..., `fc8/b`); a file saved from a wrapping chain or trainer carries a prefix (`predictor/conv1a/W`,
`updater/model:main/conv1a/W`, `/conv1a/W`): any single prefix is accepted. Chainer's ConvolutionND W is
(out, in, kT, kH, kW) and Linear W is (out, in), PyTorch's layouts, and chainer flattens pool5 in (C, T, H, W)
order as `torch.flatten` does, so the arrays are copied unchanged.

The output has the 22 tensors `conv1a.weight` ... `fc8.bias` (float32) and `mean` (float32, uncropped); load it
with `eval.metrics.c3d.load_c3d`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from eval.protocols.base import file_sha256  # noqa: E402

LAYERS = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b", "fc6", "fc7", "fc8")
CHAINER_PARAMS = {"W": "weight", "b": "bias"}


def find_prefix(keys: list[str]) -> str:
    """The prefix in front of `conv1a/W` shared by all 22 C3D arrays; a clear error listing the keys otherwise."""
    needed = [f"{layer}/{p}" for layer in LAYERS for p in CHAINER_PARAMS]
    prefixes = sorted({k[: -len("conv1a/W")] for k in keys if k.endswith("conv1a/W")})
    complete = [p for p in prefixes if all(p + n in keys for n in needed)]
    if len(complete) == 1:
        return complete[0]
    shown = ", ".join(sorted(keys)[:40]) + (", ..." if len(keys) > 40 else "")
    if not complete:
        raise KeyError(f"no complete set of TGAN2 C3D arrays ({needed[0]}, ..., {needed[-1]}, with one optional "
                       f"prefix) in the weights npz; it has {len(keys)} keys: {shown}")
    raise KeyError(f"several C3D array sets in the weights npz (prefixes {complete}); keys: {shown}")


def convert(weights: str | Path, mean: str | Path) -> dict[str, np.ndarray]:
    """The project's state (PyTorch names, float32) from TGAN2's two npz files."""
    for path in (weights, mean):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found (TGAN2 release files conv3d_deepnetA_ucf.npz and mean2.npz)")
    with np.load(weights) as npz:
        keys = list(npz.keys())
        prefix = find_prefix(keys)
        out = {f"{layer}.{name}": np.ascontiguousarray(npz[f"{prefix}{layer}/{p}"], dtype=np.float32)
               for layer in LAYERS for p, name in CHAINER_PARAMS.items()}
    with np.load(mean) as npz:
        if "mean" not in npz:
            raise KeyError(f"{mean} has no 'mean' array; keys: {list(npz.keys())}")
        out["mean"] = np.ascontiguousarray(npz["mean"], dtype=np.float32)
    check_shapes(out)
    return out


def check_shapes(state: dict[str, np.ndarray]) -> None:
    """A C3D v1.0 structure: 3x3x3 convs chained 3 -> ... -> C5, fc6 on the (C5, 1, 4, 4) pool5 of a 16x112x112
    clip, fc7 and fc8 chained. The official file is 64, 128, 256, 256, 512 x4, 4096, 4096, 101; any width is
    accepted so that scaled-down test files convert too (`load_c3d(path, width=..., fc_dim=...)`)."""
    wrong = []
    c_in = 3
    for layer in LAYERS[:8]:
        w, b = state[f"{layer}.weight"], state[f"{layer}.bias"]
        if w.ndim != 5 or w.shape[1:] != (c_in, 3, 3, 3) or b.shape != (w.shape[0],):
            wrong.append(f"{layer}: W {w.shape}, b {b.shape} (expected (out, {c_in}, 3, 3, 3), (out,))")
        c_in = w.shape[0]
    n_in = c_in * 16  # pool5 of a 16x112x112 clip is (C5, 1, 4, 4)
    for layer in LAYERS[8:]:
        w, b = state[f"{layer}.weight"], state[f"{layer}.bias"]
        if w.ndim != 2 or w.shape[1] != n_in or b.shape != (w.shape[0],):
            wrong.append(f"{layer}: W {w.shape}, b {b.shape} (expected (out, {n_in}), (out,))")
        n_in = w.shape[0]
    if state["mean"].ndim != 4 or state["mean"].shape[0] != 3:
        wrong.append(f"mean: {state['mean'].shape} (expected (3, 16, 128, 171))")
    if wrong:
        raise ValueError("arrays do not form a C3D v1.0: " + "; ".join(wrong))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="TGAN2's conv3d_deepnetA_ucf.npz")
    parser.add_argument("--mean", required=True, help="TGAN2's mean2.npz")
    parser.add_argument("--out", default="c3d_ucf101_tgan2.safetensors")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    state = convert(args.weights, args.mean)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"source_weights": Path(args.weights).name, "source_weights_sha256": file_sha256(args.weights),
                "source_mean": Path(args.mean).name, "source_mean_sha256": file_sha256(args.mean),
                "format": "eval.metrics.c3d.C3D state dict + mean (3, T, 128, 171) BGR"}
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(out), metadata=metadata)
    print(f"wrote {out} ({len(state) - 1} tensors + mean {tuple(state['mean'].shape)})")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
