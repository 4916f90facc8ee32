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
from datamodules.video_io import write_video  # noqa: E402
from eval.generation import video_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_checkpoint", help="a LoongTokenizer checkpoint (train.py's last.ckpt)")
    parser.add_argument("--tokenizer-config", default="loong_tokenizer_tiny", help="its model config (configs/model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the tokenizer's model config, e.g. 'model.encoder.channel_multipliers=[1,2,3]'")
    parser.add_argument("--num-videos", type=int, default=64)
    parser.add_argument("--out", default="logs/eval/synthetic/tokenizer_ceiling")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model={args.tokenizer_config}", "eval=synthetic",
                                             f"eval.num_videos={args.num_videos}", f"paths.root_dir={REPO}", *args.set])
    protocol = instantiate(cfg.eval, _convert_="all")
    protocol.check_inputs()
    tokenizer = instantiate(cfg.model, _convert_="all")
    tokenizer.load_pretrained(args.tokenizer_checkpoint)
    tokenizer.eval()

    jobs, frames, size = protocol.jobs(), protocol.num_frames, protocol.resolution
    rendered = frames + (-(frames - 1)) % 4  # next 1 + 4k
    out = Path(args.out)
    for job in jobs:
        _, clip = render_item(job.index, rendered, (size, size), protocol.dataset_seed, protocol.split)
        video = torch.from_numpy(clip).permute(0, 3, 1, 2)[None].float() / 127.5 - 1  # (1, T, C, H, W)
        with torch.no_grad():
            recon = tokenizer.decode(tokenizer.encode(video))
        recon = ((recon[0, :frames] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        write_video(video_path(out / "real", job.index), clip[:frames], fps=8)
        write_video(video_path(out / "reconstructed", job.index), recon, fps=8)

    device = torch.device("cpu")
    scores = {}
    for name in ("real", "reconstructed"):
        metrics = protocol.score(out / name, jobs, device)
        scores[name] = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        print(name, scores[name])
    record = {"tokenizer_checkpoint": args.tokenizer_checkpoint, "protocol": protocol.settings(), "scores": scores}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
