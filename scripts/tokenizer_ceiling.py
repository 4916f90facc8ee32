"""What `eval=synthetic` gives the real test clips and a video tokenizer's reconstructions of them.

    python scripts/tokenizer_ceiling.py logs/train/tiny_loong_tokenizer/clips65/checkpoints/last.ckpt \
        --num-videos 64 --out logs/eval/synthetic/tokenizer_ceiling

A Loong model can draw no video its tokenizer cannot decode, so the protocol's scores of the tokenizer's
reconstructions of the prompts' own clips bound what the language model can reach (docs/loong.md); the real clips'
scores bound every generator. Both are scored exactly as eval/run_synthetic.py scores generated videos: the same
prompts (captions of the test split's items 0..N-1), feature nets and real statistics, from mp4 files written to
<out>/real/videos and <out>/reconstructed/videos. The tokenizer takes 1 + 4k frames: the clip is rendered at the
next such length and cut back to the protocol's frame count after decoding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.synthetic import render_item  # noqa: E402
from datamodules.transforms import to_model_range, to_uint8  # noqa: E402
from datamodules.video_io import write_video  # noqa: E402
from eval.generation import video_path  # noqa: E402
from eval.tokenizer_report import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_checkpoint", type=Path,
                        help="a LoongTokenizer checkpoint from a train.py run (RUN/checkpoints/*.ckpt; the model is "
                             "built from RUN/config.yaml, as eval/tokenizer_report.py does)")
    parser.add_argument("--num-videos", type=int, default=64)
    parser.add_argument("--out", default="logs/eval/synthetic/tokenizer_ceiling")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=synthetic", f"eval.num_videos={args.num_videos}",
                                             f"paths.root_dir={REPO}"])
    protocol = instantiate(cfg.eval, _convert_="all")
    protocol.check_inputs()
    tokenizer, _ = load_tokenizer(args.tokenizer_checkpoint)

    jobs, frames, size = protocol.jobs(), protocol.num_frames, protocol.resolution
    rendered = frames + (-(frames - 1)) % 4  # next 1 + 4k
    out = Path(args.out)
    for job in jobs:
        _, clip = render_item(job.index, rendered, (size, size), protocol.dataset_seed, protocol.split)
        with torch.no_grad():
            recon = tokenizer.decode(tokenizer.encode(to_model_range(clip)[None]))  # (1, T, C, H, W)
        write_video(video_path(out / "real", job.index), clip[:frames], fps=8)
        write_video(video_path(out / "reconstructed", job.index), to_uint8(recon[0, :frames]), fps=8)

    device = torch.device("cpu")
    scores = {}
    for name in ("real", "reconstructed"):
        metrics = protocol.score(out / name, jobs, device)
        scores[name] = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        print(name, scores[name])
    record = {"tokenizer_checkpoint": str(args.tokenizer_checkpoint), "protocol": protocol.settings(), "scores": scores}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
