"""Compile benchmark: the quickstart's generation SFT step with eager and with compiled blocks (``trainer.compile``).

The embedded default's model (``configs/model/shapes.yaml``, random weights) trains generation SFT on the quickstart's
mix of shapes-world batches (generation 0.65, understanding 0.25, editing 0.1; 16 samples at 32 px, the 8 x 8 schedule)
in one process, with the stage's trainable groups. Eager and compiled steps alternate in rounds over the same model and
optimizer (``CompiledRegions.enabled`` switches between them), each round's batches once in each mode, so a shared
machine's drift and the batches' mix reach both alike. Inductor compiles into a fresh, empty cache folder (a first run
on a new machine) unless ``--warm-cache`` keeps the usual one.
Reported: the median seconds of an eager and of a compiled step and their ratio, the first compiled steps' time beyond
the compiled median (tracing and compiling), the steps that repay it, and the loss of both modes on the same batch and
weights.

``python benchmarks/compile.py [--device cuda] [--steps 20] [--rounds 3] [--targets llm decoder] [--threads 1]
[--warm-cache]``;
prints a Markdown table. Run it on a quiet machine: its step times are the only thing it measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from vargpt.compile import compile_regions
from vargpt.config import VARGPTConfig
from vargpt.config_io import dataclass_from_dict, load_yaml
from vargpt.model import VARGPT
from vargpt.stages import STAGES, StageConfig
from vargpt.stages.base import build_optimizer

ROOT = Path(__file__).resolve().parents[1]

MODEL = ROOT / "configs/model/shapes.yaml"
MIX = {"generation": 0.65, "understanding": 0.25, "editing": 0.1}  # configs/quickstart/generation_sft.yaml
TRAINABLE = ["llm", "decoder", "in_projector", "out_projector", "start_condition"]
COMPILE_STEPS = 3  # the first compiled steps, timed apart: they trace and compile


def shapes_tokenizer(vocab_size: int) -> Any:
    """The quickstart's byte-level BPE (its ids are the ones configs/model/shapes.yaml names), from a small corpus."""
    from datamodules.shapes.samples import SAMPLE_KINDS, make_sample
    from vargpt.text_tokenizer import train_text_tokenizer

    def corpus() -> Any:
        for kind in SAMPLE_KINDS:
            for index in range(300):
                sample = make_sample(kind, index, 0, "train", 8, 4)
                for message in [*sample.messages, sample.chosen, sample.rejected]:
                    if message:
                        yield message["content"]

    return train_text_tokenizer(corpus(), vocab_size=vocab_size)


def shapes_batches(folder: Path, tokenizer: Any, config: VARGPTConfig, count: int, batch_size: int) -> list[dict]:
    """``count`` batches of the generation SFT mix from shards written under ``folder``."""
    from datamodules.shapes.write import write_shards

    write_shards(folder, count_per_kind=max(64, count * batch_size // 2), seed=0, size=32, kinds=list(MIX),
                 questions_per_image=4)
    data = DataConfig(
        train_sources=[{"shards": str(folder / kind), "name": kind, "weight": weight} for kind, weight in MIX.items()],
        batch_size=batch_size, batches_per_epoch=count, num_workers=0, persistent_workers=False, shuffle_buffer=64,
        generation_size=32, generation_schedule=config.generation_schedule, resize_ratio=1.0,
        placeholder_multiple=config.placeholder_multiple, max_length=512,
        understanding_min_pixels=config.understanding_min_pixels,
        understanding_max_pixels=config.understanding_max_pixels,
    )
    datamodule = ShardDataModule(data, tokenizer, rank=0, world_size=1)
    datamodule.setup("fit")
    return list(datamodule.train_dataloader())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(module: Any, optimizer: Any, batches: list[dict], device: torch.device, start: int) -> list[float]:
    seconds = []
    for index, batch in enumerate(batches):
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        synchronize(device)
        started = time.perf_counter()
        module.training_step(batch, start + index).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def same_batch_losses(model: VARGPT, regions: Any, batch: dict, device: torch.device) -> tuple[float, float]:
    """The eager and the compiled training loss of one batch with the same weights and corruption draws."""
    batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    losses = []
    for enabled in (False, True):
        regions.enabled = enabled
        losses.append(model.training_forward(batch, torch.Generator(device=device).manual_seed(0)).loss.item())
    return losses[0], losses[1]


def measure(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    config = dataclass_from_dict(VARGPTConfig, load_yaml(MODEL), "model")
    tokenizer = shapes_tokenizer(config.vocab_size - 17)
    torch.manual_seed(0)
    model = VARGPT(config)
    model.attach_tokenizer(tokenizer)
    model.to(device).train()
    stage = StageConfig(stage="generation_sft", trainable=TRAINABLE, seed=0)
    module = STAGES["generation_sft"](model, stage)
    module.train()
    optimizer = build_optimizer(module, stage)
    per_round = args.steps
    with tempfile.TemporaryDirectory() as folder:
        data = shapes_batches(Path(folder), tokenizer, config, 2 + COMPILE_STEPS + args.rounds * per_round, 16)
    regions = compile_regions(model, args.targets, backend=args.backend, mode=args.mode)
    regions.enabled = False
    timed_steps(module, optimizer, data[:2], device, 0)  # eager warm-up (allocator, first-call costs)
    regions.enabled = True
    first = timed_steps(module, optimizer, data[2:2 + COMPILE_STEPS], device, 2)
    eager: list[float] = []
    compiled: list[float] = []
    start = 2 + COMPILE_STEPS
    for _ in range(args.rounds):
        for mode, seconds in (("eager", eager), ("compiled", compiled)):
            regions.enabled = mode == "compiled"
            seconds += timed_steps(module, optimizer, data[start:start + per_round], device, start)
        start += per_round
    eager_loss, compiled_loss = same_batch_losses(model, regions, data[-1], device)
    eager_step, compiled_step = statistics.median(eager), statistics.median(compiled)
    overhead = sum(first) - COMPILE_STEPS * compiled_step
    saving = eager_step - compiled_step
    return {
        "eager_step": eager_step, "compiled_step": compiled_step, "ratio": compiled_step / eager_step,
        "compile_overhead": overhead, "steps_to_repay": overhead / saving if saving > 0 else float("inf"),
        "eager_loss": eager_loss, "compiled_loss": compiled_loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["llm", "decoder"], help="as trainer.compile.targets")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a DDP process has one)")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's usual cache folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.warm_cache:
        result = measure(args)
    else:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            result = measure(args)
    print(f"generation SFT step of the quickstart model ({args.device}, {args.threads} thread(s), batch 16 at 32 px, "
          f"targets {' '.join(args.targets)}, {args.backend}, {'warm' if args.warm_cache else 'cold'} cache; "
          f"{args.rounds} x {args.steps} steps per mode)\n")
    print("| eager s/step | compiled s/step | compiled / eager | compile overhead s | steps to repay | "
          "loss eager / compiled |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['eager_step']:.4f} | {result['compiled_step']:.4f} | {result['ratio']:.3f} | "
          f"{result['compile_overhead']:.1f} | {result['steps_to_repay']:.0f} | "
          f"{result['eager_loss']:.5f} / {result['compiled_loss']:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
