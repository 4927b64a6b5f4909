"""Optimizer benchmark: the quickstart's generation SFT step with AdamW and with Muon (``optimizer.name``).

The embedded default's model (random weights) and its generation SFT stage as ``configs/quickstart/generation_sft.yaml``
sets them up (model, trainable groups, learning rate, batch size and mix of shapes-world kinds, at the last resolution;
shards of a few batches written for the run), eager, in one process. One ``AdamW`` and one ``MuonAdamW`` over the same
parameters take turns in rounds, each round's batches once with each, so a shared machine's drift reaches both alike.
Reported: the median seconds of a whole training step (forward, backward, optimizer step) and of the optimizer step
alone with each, and their ratios. Muon's extra cost is its Newton-Schulz iterations, five pairs of matrix products per
weight matrix and step, which do not depend on the batch: a larger batch or a GPU makes the ratio smaller.

With ``--processes N`` (N > 1) it times instead the Muon optimizer step in N data-parallel processes (gloo on CPU,
NCCL on CUDA devices 0..N-1), each with the same weights and gradients as DDP gives them: every process
orthogonalising every matrix (``optimizer.muon_shard: false``) against each orthogonalising its share, with one
all-gather (``muon_shard: true``), the two taking turns on the same gradients. Reported: rank 0's median seconds of
each (every step starts at a barrier, so the slowest process sets it) and their ratio.

``python benchmarks/optimizer.py [--device cuda] [--steps 10] [--rounds 3] [--threads 1] [--processes 1]``; prints a
Markdown table. Run it on a quiet machine: its step times are the only thing it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def sharded_rank(rank: int, args: argparse.Namespace, folder: str) -> None:
    """One of ``args.processes`` data-parallel processes: the Muon step with and without sharding, on the same
    gradients; rank 0 writes the medians to ``folder``/result.json."""
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = dist.FileStore(f"{folder}/store", args.processes)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=args.processes)
    try:
        _, run, _, module = stage_module(device)
        generator = torch.Generator(device=device).manual_seed(0)  # the same gradients in every process, as DDP's
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.randn(parameter.shape, generator=generator, device=device)
        optimizers = {}
        for shard in (False, True):
            options = dataclasses.replace(run.stage.optimizer, name="muon", muon_shard=shard)
            optimizers[shard] = build_optimizer(module, dataclasses.replace(run.stage, optimizer=options))

        def step(optimizer: torch.optim.Optimizer) -> None:
            dist.barrier()
            optimizer.step()

        for optimizer in optimizers.values():  # warm-up: first-call costs, each optimizer's state
            step(optimizer)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for shard, optimizer in optimizers.items():
                seconds[shard] += timed_calls(lambda: step(optimizer), args.steps, device)
        if rank == 0:
            Path(folder, "result.json").write_text(json.dumps({str(shard): statistics.median(values)
                                                               for shard, values in seconds.items()}))
    finally:
        dist.destroy_process_group()


def measure_sharded(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(sharded_rank, args=(args, folder), nprocs=args.processes, join=True, start_method="spawn")
        return json.loads(Path(folder, "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="steps per optimizer and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a DDP process has one)")
    parser.add_argument("--processes", type=int, default=1,
                        help="> 1: the Muon step in this many data-parallel processes, sharded or not")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the quickstart's configs name their model file relative to the repository root
    if args.processes > 1:
        result = measure_sharded(args)
        whole, sharded = result["False"], result["True"]
        print(f"Muon optimizer step of the quickstart's generation SFT stage in {args.processes} data-parallel "
              f"processes ({args.device}, {args.threads} thread(s) each; {args.rounds} x {args.steps} steps each)\n")
        print("| every process orthogonalises every matrix s | each its share, then an all-gather s | ratio |")
        print("|---|---|---|")
        print(f"| {whole:.4f} | {sharded:.4f} | {sharded / whole:.3f} |")
        return 0
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
