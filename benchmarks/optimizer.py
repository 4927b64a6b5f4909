"""Optimizer benchmark: the quickstart's generation SFT step with AdamW and with Muon (``optimizer.name``).

The embedded default's model (random weights) and its generation SFT stage as ``configs/quickstart/generation_sft.yaml``
sets them up (model, trainable groups, learning rate, batch size and mix of shapes-world kinds, at the last resolution;
shards of a few batches written for the run), eager, in one process. One ``AdamW`` and one ``MuonAdamW`` over the same
parameters take turns in rounds, each round's batches once with each, so a shared machine's drift reaches both alike.
Reported: the median seconds of a whole training step (forward, backward, optimizer step) and of the optimizer step
alone with each, and their ratios. Muon's extra cost is its Newton-Schulz iterations, five pairs of matrix products per
weight matrix and step, which do not depend on the batch: a larger batch or a GPU makes the ratio smaller.

``python benchmarks/optimizer.py [--device cuda] [--steps 10] [--rounds 3] [--threads 1]``; prints a Markdown table.
Run it on a quiet machine: its step times are the only thing it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import torch

from compile import ROOT, stage_batches, stage_module, timed_steps
from timing import timed_calls, to_device
from vargpt.stages.base import build_optimizer

OPTIMIZERS = ("adamw", "muon")


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = torch.device(args.device)
    quickstart, run, tokenizer, module = stage_module(device)
    optimizers = {}
    for name in OPTIMIZERS:
        stage = dataclasses.replace(run.stage, optimizer=dataclasses.replace(run.stage.optimizer, name=name))
        optimizers[name] = build_optimizer(module, stage)
    with tempfile.TemporaryDirectory() as folder:
        data = stage_batches(Path(folder), quickstart, run, tokenizer, 2 + args.rounds * args.steps)
    for name in OPTIMIZERS:  # warm-up: allocator, first-call costs, each optimizer's state
        timed_steps(module, optimizers[name], data[:1], device, 0)
    steps: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    updates: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    start = 2
    for _ in range(args.rounds):
        for name in OPTIMIZERS:
            steps[name] += timed_steps(module, optimizers[name], data[start:start + args.steps], device, start)
        module.training_step(to_device(data[start], device), start).backward()
        for name in OPTIMIZERS:  # the optimizer step alone, on the same gradients
            updates[name] += timed_calls(optimizers[name].step, args.steps, device)
        module.zero_grad(set_to_none=True)
        start += args.steps
    return {name: {"step": statistics.median(steps[name]), "update": statistics.median(updates[name])}
            for name in OPTIMIZERS} | {"run": {"batch_size": run.data.batch_size, "size": quickstart.data.size}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="steps per optimizer and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a DDP process has one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the quickstart's configs name their model file relative to the repository root
    result = measure(args)
    adamw, muon = result["adamw"], result["muon"]
    print(f"generation SFT step of the quickstart model ({args.device}, {args.threads} thread(s), batch "
          f"{result['run']['batch_size']} at {result['run']['size']} px, eager; {args.rounds} x {args.steps} steps "
          "per optimizer)\n")
    print("| | AdamW s | Muon with AdamW s | Muon / AdamW |")
    print("|---|---|---|---|")
    print(f"| training step | {adamw['step']:.4f} | {muon['step']:.4f} | {muon['step'] / adamw['step']:.3f} |")
    print(f"| optimizer step alone | {adamw['update']:.4f} | {muon['update']:.4f} | "
          f"{muon['update'] / adamw['update']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
