"""Data pipeline throughput per worker, against reading the same images from a plain folder with PIL.

For each image size it writes synthetic shards (PIL-drawn shapes; generation, understanding and editing samples in
turn) into a temporary folder, plus the same images as PNG files in a plain folder. It then times, in one process
(= one DataLoader worker):

* pipeline: ``ShardDataModule``'s training stream: tar reading, PNG decode, validation, shuffle buffer, generation
  transform (LANCZOS resize + random crop to the size, schedule ``schedule_for_latent(size / 16)``: 640 placeholders
  at 256 px, 2560 at 512 px), Qwen2-VL preprocessing of understanding inputs (at most 512*512 pixels), chat-template
  tokenization with a locally trained BPE tokenizer, and collation;
* baseline: ``PIL.Image.open(path).convert("RGB")`` of every image file of the same samples.

"ratio" is pipeline time over baseline time for the same images: the cost of everything beyond decoding. Timings
are the best of ``--repeats`` passes after one warm-up pass.

Example: ``python benchmarks/data.py`` or ``python benchmarks/data.py --sizes 64 256 --samples 64``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from datamodules.shards import ShardWriter
from datamodules.synthetic import synthetic_sample
from vargpt.schedules import schedule_for_latent
from vargpt.text_tokenizer import train_text_tokenizer

KINDS = ("generation", "understanding", "editing")
VAE_STRIDE = 16  # INFINITY §1.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--samples", type=int, default=96, help="samples per size (a multiple of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one worker = one core)")
    return parser.parse_args()


def write_data(root: Path, size: int, num_samples: int) -> list[Path]:
    """Shards under ``root/shards`` and the same images as PNG files; returns the image files."""
    rng = random.Random(size)
    files = []
    (root / "plain").mkdir(parents=True)
    with ShardWriter(root / "shards", max_samples=16) as writer:
        for index in range(num_samples):
            sample = synthetic_sample(KINDS[index % len(KINDS)], f"s{index:06d}", rng, size)
            writer.write(sample)
            for name, image in sample.images.items():
                files.append(root / "plain" / f"{sample.key}_{name}")
                image.save(files[-1])
    return files


def time_pipeline(root: Path, size: int, num_samples: int, batch_size: int, tokenizer, repeats: int) -> float:
    latent = size // VAE_STRIDE
    config = DataConfig(
        train_sources=[{"shards": str(root / "shards")}], batch_size=batch_size,
        batches_per_epoch=num_samples // batch_size, num_workers=0, shuffle_buffer=16, generation_size=size,
        generation_schedule=[list(scale) for scale in schedule_for_latent(latent, latent)], max_length=16384,
    )
    datamodule = ShardDataModule(config, tokenizer)
    loader = datamodule.train_dataloader()
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        elapsed = time.perf_counter() - start
        assert batches == num_samples // batch_size
        if attempt > 0:  # the first pass warms up
            best = min(best, elapsed)
    assert datamodule.skip_stats()["train"]["skipped"] == 0
    return best


def time_plain_folder(files: list[Path], repeats: int) -> float:
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")
        elapsed = time.perf_counter() - start
        if attempt > 0:
            best = min(best, elapsed)
    return best


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = train_text_tokenizer(
        ["Draw a red circle.", "What is in this picture? It shows a blue square.", "Change it into a green square."],
        vocab_size=512,
    )
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            files = write_data(Path(folder), size, args.samples)
            pipeline = time_pipeline(Path(folder), size, args.samples, args.batch_size, tokenizer, args.repeats)
            plain = time_plain_folder(files, args.repeats)
        rows.append((size, args.samples / pipeline, len(files) / pipeline, len(files) / plain, pipeline / plain))
    print(f"samples per size: {args.samples} ({', '.join(KINDS)} in turn), batch size {args.batch_size}, "
          f"torch threads {args.threads}, one worker")
    print()
    print("| size | pipeline samples/s | pipeline images/s | PIL folder images/s | ratio (pipeline / PIL time) |")
    print("|---:|---:|---:|---:|---:|")
    for size, samples_per_s, images_per_s, plain_per_s, ratio in rows:
        print(f"| {size} | {samples_per_s:.1f} | {images_per_s:.1f} | {plain_per_s:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
