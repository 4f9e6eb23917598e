"""Training-thread time for one 100-frame 64x64 video, against wandb.Video's GIF path.

Both run in one process, interleaved, into real W&B offline runs: wandb.Video with
its default GIF encoding (moviepy) and ``run.log``, against tracklog's ``record`` +
``dump`` with a W&B output (MP4 through PyAV). Afterwards both runs are read back
from their .wandb logs: every video must be there.

    python bench/bench_video.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import wandb

import tracklog
from tracklog.readers import read_wandb_offline

os.environ.setdefault("WANDB_SILENT", "true")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    frames = np.random.default_rng(0).integers(0, 256, (100, 3, 64, 64), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        seed_run = wandb.init(
            project="bench", mode="offline", dir=tmp, settings=wandb.Settings(console="off")
        )
        logger = tracklog.build_logger(
            {
                "run_dir": str(Path(tmp) / "tracklog"),
                "outputs": [{"type": "wandb", "project": "bench"}],
            }
        )
        gif_times: list[float] = []
        our_times: list[float] = []
        for step in range(args.repeats):
            start = time.perf_counter()
            video = wandb.Video(frames, fps=30, format="gif")  # the seed's (old default) path
            seed_run.log({"video": video, "global_step": step})
            gif_times.append(time.perf_counter() - start)

            start = time.perf_counter()
            logger.record("video", tracklog.Video(frames, fps=30))
            logger.dump(step)
            our_times.append(time.perf_counter() - start)
        seed_dir = Path(seed_run.dir).parent
        seed_run.finish()
        logger.close()
        seed_videos = sum("video" in row.values for row in read_wandb_offline(seed_dir).rows)
        ours = read_wandb_offline(Path(tmp) / "tracklog")
        our_videos = sum("video" in row.values for row in ours.rows)
    gif, mp4 = statistics.median(gif_times), statistics.median(our_times)
    print(f"one 100-frame 64x64 video into a W&B offline run, {args.repeats} repeats, interleaved")
    print(f"  wandb.Video (GIF via moviepy) + run.log   median {gif * 1e3:8.1f} ms")
    print(f"  tracklog record + dump (MP4 via PyAV)     median {mp4 * 1e3:8.1f} ms")
    print(
        f"  tracklog is {gif / mp4:.1f}x faster; videos read back: {seed_videos} and {our_videos}"
    )
    return 0 if seed_videos == our_videos == args.repeats else 1


if __name__ == "__main__":
    sys.exit(main())
