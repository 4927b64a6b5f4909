"""Patch-embedding benchmark: Qwen2-VL's ``PatchEmbed`` (a ``Conv3d`` whose kernel is its stride) against
``vargpt.patch_embed.LinearPatchEmbed`` (the same weight, one matrix product).

Two measurements, each timing the two forms in alternating rounds in one process, so a shared machine's drift
reaches both alike:

1. ``vision step``: the quickstart's vision pretraining step as ``configs/quickstart/pipeline.yaml`` sets it up
   (``vargpt.quickstart.vision``: the model config's ViT and merger with the token head, its scene size, image pixels
   and label coverage; ``--batch`` scenes, forward, backward and AdamW), the tower built once and its ``patch_embed``
   switched between the stock module and the linear one over the same ``Conv3d``.
2. ``embedding``: the embedding alone, forward and weight gradient, at Qwen2-VL's patch geometry (patch 14, temporal
   2, 3 channels) and the quickstart tower's width (64) and Qwen2-VL-2B's (1280), on ``--patches`` patches.

Reported: the median seconds per call of each form, their ratio (linear / stock) and the largest difference of the
outputs. ``python benchmarks/patch_embed.py [--device cuda] [--dtype bfloat16] [--threads 2] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

from timing import timed_calls
from vargpt.patch_embed import LinearPatchEmbed, use_linear_patch_embed
from vargpt.quickstart.config import load_quickstart_config
from vargpt.quickstart.pipeline import vision_stage, vision_step_config
from vargpt.quickstart.vision import TokenHead, build_vision_tower, head_loss, make_scenes

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "quickstart" / "pipeline.yaml"
PATCH, TEMPORAL, CHANNELS = 14, 2, 3  # Qwen2-VL's patch geometry (its vision config's defaults)


def alternate(calls: dict[str, Callable[[], None]], rounds: int, per_round: int, device: torch.device,
              switch: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """Median seconds per call of each entry of ``calls``, run in turn ``rounds`` times (after a warm-up call each)."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        switch(name)
        timed_calls(call, 2, device)
    for _ in range(rounds):
        for name, call in calls.items():
            switch(name)
            seconds[name] += timed_calls(call, per_round, device)
    return {name: statistics.median(values) for name, values in seconds.items()}


def vision_step(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    quickstart = load_quickstart_config(PIPELINE)
    run = vision_stage(quickstart)
    if run is None:
        raise SystemExit(f"{PIPELINE}: no stage starts from the pipeline's vision tower, so there is no vision step")
    step = vision_step_config(quickstart, run)
    scenes = make_scenes(max(args.batch, 64), 0, "train", step["size"], *step["understanding_pixels"],
                         quickstart.vision.min_coverage)
    torch.manual_seed(0)
    visual = build_vision_tower(run.model_config().qwen2_vl).to(device).train()  # patch_embed already linear
    linear_embed = visual.patch_embed
    with torch.device("meta"):  # a placeholder Conv3d, replaced by the tower's own just below
        stock_embed = PatchEmbed(linear_embed.patch_size, linear_embed.temporal_patch_size, linear_embed.in_channels,
                                 linear_embed.embed_dim)
    stock_embed.proj = linear_embed.proj  # the same Conv3d, so both forms train one set of weights
    head = TokenHead(visual.config.hidden_size).to(device)
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-4)
    pixels, labels = scenes.pixel_values[:args.batch].to(device), scenes.labels[:args.batch].to(device)
    grid = scenes.grid_thw.to(device)

    def step() -> None:
        flat = pixels.reshape(-1, pixels.shape[-1])
        features = visual(flat, grid_thw=grid.repeat(pixels.shape[0], 1)).pooler_output
        loss = head_loss(head, features.reshape(pixels.shape[0], -1, features.shape[-1]), labels, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def switch(name: str) -> None:
        visual.patch_embed = stock_embed if name == "stock" else linear_embed

    with torch.no_grad():
        flat = pixels.reshape(-1, pixels.shape[-1])
        difference = (stock_embed(flat) - linear_embed(flat)).abs().max().item()
    result = alternate({"stock": step, "linear": step}, args.rounds, args.steps, device, switch)
    return {**result, "difference": difference}


def embedding(width: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    stock = PatchEmbed(PATCH, TEMPORAL, CHANNELS, width).to(device=device, dtype=dtype)
    holder = nn.Module()
    holder.patch_embed = stock
    use_linear_patch_embed(holder)  # holder's embedding becomes a linear one over stock's own Conv3d
    linear = holder.patch_embed
    assert isinstance(linear, LinearPatchEmbed)
    patches = torch.randn(args.patches, CHANNELS * TEMPORAL * PATCH * PATCH, device=device, dtype=dtype)

    def run(module: nn.Module) -> Callable[[], None]:
        def call() -> None:
            module(patches).float().square().mean().backward()
            stock.proj.weight.grad = None
        return call

    with torch.no_grad():
        difference = (stock(patches).float() - linear(patches).float()).abs().max().item()
    result = alternate({"stock": run(stock), "linear": run(linear)}, args.rounds, args.steps, device)
    return {**result, "difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="of the embedding-alone runs (the vision step is fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (the vision step's)")
    parser.add_argument("--batch", type=int, default=32, help="scenes per vision step (the quickstart's 32)")
    parser.add_argument("--patches", type=int, default=2048, help="patches per embedding-alone call")
    parser.add_argument("--steps", type=int, default=10, help="calls per form and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [(f"quickstart vision step ({args.batch} scenes, fp32)", vision_step(args, device))]
    for width, name in ((64, "quickstart tower"), (1280, "Qwen2-VL-2B")):
        rows.append((f"embedding alone, {name} width {width} ({args.patches} patches, {args.dtype})",
                     embedding(width, args, device, dtype)))
    print(f"patch embedding: stock Conv3d vs linear ({args.device}, {args.threads} thread(s); {args.rounds} x "
          f"{args.steps} calls per form)\n")
    print("| measured | stock s | linear s | linear / stock | max output difference |")
    print("|---|---|---|---|---|")
    for name, result in rows:
        print(f"| {name} | {result['stock']:.5f} | {result['linear']:.5f} | {result['linear'] / result['stock']:.3f} | "
              f"{result['difference']:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
