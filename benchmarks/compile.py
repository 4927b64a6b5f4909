"""Compile benchmark: the quickstart's generation SFT step with eager and with compiled blocks (``trainer.compile``).

The embedded default's model (random weights) trains generation SFT as ``configs/quickstart/generation_sft.yaml`` sets
it up (its model, trainable groups, optimizer, batch size and mix of shapes-world kinds, read from the file, at its last
resolution; shards of a few batches written for the run) in one process. Eager and compiled steps alternate in rounds
over the same model and optimizer (``CompiledRegions.enabled`` switches between them), each round's batches once in each
mode, so a shared machine's drift and the batches' mix reach both alike. Inductor compiles into a fresh, empty cache
folder (a first run on a new machine) unless ``--warm-cache`` keeps the usual one.
Reported: the median seconds of an eager and of a compiled step and their ratio, the first compiled steps' time beyond
the compiled median (tracing and compiling), the steps that repay it, and the loss of both modes on the same batch and
weights.

``python benchmarks/compile.py [--device cuda] [--steps 20] [--rounds 3] [--targets llm decoder] [--threads 1]
[--warm-cache]``;
prints a Markdown table. Run it on a quiet machine: its step times are the only thing it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datamodules.config import SourceConfig
from datamodules.datamodule import ShardDataModule
from vargpt.compile import compile_regions
from vargpt.model import VARGPT
from vargpt.quickstart.config import QuickstartConfig, load_quickstart_config
from vargpt.quickstart.pipeline import tokenizer_corpus
from vargpt.run_config import RunConfig, load_run_config
from vargpt.stages import STAGES
from vargpt.stages.base import build_optimizer
from vargpt.text_tokenizer import train_text_tokenizer
from timing import synchronize, to_device

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs/quickstart/pipeline.yaml"
STAGE = "generation_sft"
COMPILE_STEPS = 3  # the first compiled steps, timed apart: they trace and compile


def quickstart_stage() -> tuple[QuickstartConfig, RunConfig]:
    """The quickstart's pipeline config and its generation SFT run config (model, stage, data mix, batch size)."""
    quickstart = load_quickstart_config(PIPELINE)
    return quickstart, load_run_config(quickstart.stage_file(STAGE), quickstart.stage_arguments(STAGE))


def stage_batches(
    folder: Path, quickstart: QuickstartConfig, run: RunConfig, tokenizer: Any, count: int
) -> list[dict[str, Any]]:
    """``count`` batches of the stage's data mix, from shards of each of its kinds written under ``folder``."""
    from datamodules.shapes.write import write_shards

    kinds = [source.name for source in run.data.train_sources]
    write_shards(folder, count_per_kind=max(64, count * run.data.batch_size // 2), seed=0, size=quickstart.data.size,
                 kinds=kinds, questions_per_image=quickstart.data.questions_per_image)
    sources = [SourceConfig(shards=str(folder / source.name), name=source.name, weight=source.weight)
               for source in run.data.train_sources]
    data = dataclasses.replace(run.data, train_sources=sources, batches_per_epoch=count, num_workers=0,
                               persistent_workers=False, shuffle_buffer=64)
    datamodule = ShardDataModule(data, tokenizer, rank=0, world_size=1)
    datamodule.setup("fit")
    return list(datamodule.train_dataloader())


def timed_steps(module: Any, optimizer: Any, batches: list[dict], device: torch.device, start: int) -> list[float]:
    seconds = []
    for index, batch in enumerate(batches):
        batch = to_device(batch, device)
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
    batch = to_device(batch, device)
    losses = []
    for enabled in (False, True):
        regions.enabled = enabled
        losses.append(model.training_forward(batch, torch.Generator(device=device).manual_seed(0)).loss.item())
    return losses[0], losses[1]


def stage_module(device: torch.device) -> tuple[QuickstartConfig, RunConfig, Any, Any]:
    """The quickstart's configs, its text tokenizer and its generation SFT stage module (the stage's trainable groups,
    random weights, seed 0) on ``device``, in training mode."""
    quickstart, run = quickstart_stage()
    tokenizer = train_text_tokenizer(tokenizer_corpus(quickstart), vocab_size=quickstart.text_tokenizer.vocab_size)
    torch.manual_seed(0)
    model = VARGPT(run.model_config())
    model.attach_tokenizer(tokenizer)
    model.to(device).train()
    module = STAGES[STAGE](model, run.stage)
    module.train()
    return quickstart, run, tokenizer, module


def measure(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    quickstart, run, tokenizer, module = stage_module(device)
    model = module.model
    optimizer = build_optimizer(module, run.stage)
    per_round = args.steps
    with tempfile.TemporaryDirectory() as folder:
        data = stage_batches(Path(folder), quickstart, run, tokenizer, 2 + COMPILE_STEPS + args.rounds * per_round)
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
        "batch_size": run.data.batch_size, "size": quickstart.data.size,
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
    os.chdir(ROOT)  # the quickstart's configs name their model file relative to the repository root
    if args.warm_cache:
        result = measure(args)
    else:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            result = measure(args)
    print(f"generation SFT step of the quickstart model ({args.device}, {args.threads} thread(s), batch "
          f"{result['batch_size']} at {result['size']} px, targets {' '.join(args.targets)}, {args.backend}, "
          f"{'warm' if args.warm_cache else 'cold'} cache; {args.rounds} x {args.steps} steps per mode)\n")
    print("| eager s/step | compiled s/step | compiled / eager | compile overhead s | steps to repay | "
          "loss eager / compiled |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['eager_step']:.4f} | {result['compiled_step']:.4f} | {result['ratio']:.3f} | "
          f"{result['compile_overhead']:.1f} | {result['steps_to_repay']:.0f} | "
          f"{result['eager_loss']:.5f} / {result['compiled_loss']:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
