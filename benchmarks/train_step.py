"""Training-step benchmark: throughput and achieved FLOP/s against a same-run matmul, and DPO peak memory.

1. Throughput: a small VARGPT (LLM hidden 512 x 4 layers, decoder width 512 x 4 blocks, the tiny BSQ-VAE) trains
   generation SFT with every transformer group trainable (so the 6N of the FLOP count is honest) on shapes-world
   batches. Achieved FLOP/s = the analytic count of ``callbacks.throughput`` (6 N + 12 L d T per token, LLM over
   every token, decoder over every image token) / measured step time, compared with a plain (M x C) @ (C x C)
   matmul of the model width timed in the same run (target >= 50%).
2. Memory: peak memory of a few DPO steps with a resident reference model and with reference log-probs computed
   ahead (in a separate process, then read from a file), each over generation SFT's peak on the same model
   (target <= 1.25x); the SFT batch has 2B rows, as many images as DPO's B chosen + B rejected. Each measurement
   runs in its own process: on CPU the peak of the resident set (sampled every millisecond from /proc/self/statm)
   minus the resident set before the models are built, on CUDA ``torch.cuda.max_memory_allocated``. DPO uses
   ``dpo.corruption: sample`` in both modes so the reference computation is the same.

``python benchmarks/train_step.py [--device cuda] [--steps 5]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from callbacks.throughput import VARGPTFlopModel, count_batch
from datamodules.config import DataConfig
from datamodules.datamodule import ShardDataModule
from vargpt.config import VARGPTConfig
from vargpt.config_io import dataclass_from_dict, load_yaml
from vargpt.model import VARGPT
from vargpt.stages import STAGES, ReferenceLogProbs, StageConfig, precompute_reference_logps
from vargpt.stages.base import build_optimizer
from vargpt.text_tokenizer import train_text_tokenizer
from timing import synchronize, to_device

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 64  # of the LLM and the decoder at every --width; the M-RoPE sections below split its half


def small_overrides(width: int) -> list[str]:
    """On configs/model/tiny.yaml: LLM and decoder ``width`` wide (head dim 64), 4 layers each, FFN 4x; token ids
    stay those of the tiny tokenizer."""
    heads = width // HEAD_DIM
    return [
        f"qwen2_vl.text_config.hidden_size={width}",
        "qwen2_vl.text_config.num_hidden_layers=4",
        f"qwen2_vl.text_config.num_attention_heads={heads}",
        f"qwen2_vl.text_config.num_key_value_heads={math.gcd(heads, 2)}",  # tiny.yaml's 2 where they divide heads
        f"qwen2_vl.text_config.intermediate_size={4 * width}",
        "qwen2_vl.text_config.rope_parameters.mrope_section=[8,12,12]",  # head dim 64 = 2 x (8 + 12 + 12)
        f"qwen2_vl.vision_config.hidden_size={width}",
        f"decoder.width={width}",
        "decoder.depth=4",
        f"decoder.heads={heads}",
        f"decoder.condition_dim={width}",
    ]


SCHEDULE_32PX = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]  # the tiny VAE (stride 4) at 32 px: 121 tokens
ALL_TRANSFORMER_GROUPS = ["llm", "lm_head", "in_projector", "out_projector", "start_condition", "decoder"]
GENERATION_GROUPS = ["in_projector", "out_projector", "start_condition", "decoder"]
WARMUP_STEPS = 2


def small_tokenizer() -> Any:
    """A 300-token BPE: the id layout configs/model/tiny.yaml expects."""
    return train_text_tokenizer(["a red circle left of a blue square", "two green triangles"], vocab_size=300)


def small_model(width: int, seed: int = 0) -> VARGPT:
    """The benchmark's model (``small_overrides``) with the small tokenizer attached, in training mode."""
    overrides = small_overrides(width)
    config = dataclass_from_dict(VARGPTConfig, load_yaml(ROOT / "configs/model/tiny.yaml", overrides), "model")
    torch.manual_seed(seed)
    model = VARGPT(config)
    model.attach_tokenizer(small_tokenizer())
    return model.train()


def write_data(folder: Path) -> None:
    from datamodules.shapes.write import write_shards

    write_shards(folder, count_per_kind=64, seed=0, size=32, kinds=["generation", "preference"])


def batches(folder: Path, kind: str, tokenizer: Any, count: int, batch_size: int) -> list[dict[str, Any]]:
    """The first ``count`` batches of a deterministic single-process stream over ``folder/kind``."""
    config = DataConfig(
        train_sources=[{"shards": str(folder / kind), "name": kind}],
        mode="preference" if kind == "preference" else "sft",
        batch_size=batch_size, batches_per_epoch=count, num_workers=0, persistent_workers=False, shuffle_buffer=8,
        generation_size=32, generation_schedule=SCHEDULE_32PX, placeholder_multiple=8, max_length=1024,
    )
    datamodule = ShardDataModule(config, tokenizer, rank=0, world_size=1)
    datamodule.setup("fit")
    return list(datamodule.train_dataloader())


def train_steps(module: Any, config: StageConfig, steps: list[dict[str, Any]], device: torch.device) -> list[float]:
    """Plain optimizer steps (forward, backward, AdamW) over ``steps``; seconds of each."""
    optimizer = build_optimizer(module, config)
    seconds = []
    for index, batch in enumerate(steps):
        batch = to_device(batch, device)
        synchronize(device)
        started = time.perf_counter()
        module.training_step(batch, index).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def matmul_flops_per_second(width: int, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of eight chained (4096 x C) @ (C x C) matmuls (median of ``repeats``)."""
    a, b = torch.randn(4096, width, device=device), torch.randn(width, width, device=device)
    timings = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        out = a
        for _ in range(8):
            out = out @ b
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return 8 * 2 * 4096 * width * width / statistics.median(timings[1:])


def measure_throughput(
    folder: Path, device: torch.device, steps: int, batch_size: int, width: int
) -> dict[str, float]:
    model = small_model(width)
    tokenizer = model.text_tokenizer
    model.to(device)
    config = StageConfig(stage="generation_sft", trainable=ALL_TRANSFORMER_GROUPS, seed=0)
    module = STAGES["generation_sft"](model, config)
    data = batches(folder, "generation", tokenizer, WARMUP_STEPS + steps, batch_size)
    seconds = train_steps(module, config, data, device)[WARMUP_STEPS:]
    flop_model = VARGPTFlopModel.from_model(model)
    flops = 0.0
    for batch in data[WARMUP_STEPS:]:
        count = count_batch(batch)
        flops += flop_model.batch_flops(count.llm_tokens, count.sequence_length, count.images, count.tokens_per_image)
    achieved = flops / sum(seconds)
    matmul = matmul_flops_per_second(model.config.decoder.width, device)
    return {"samples_per_s": batch_size * steps / sum(seconds), "achieved": achieved, "matmul": matmul}


class ResidentPeak:
    """The largest resident set size seen while active (a background thread samples /proc/self/statm)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> ResidentPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def peak_memory_child(
    mode: str, folder: Path, device: torch.device, steps: int, batch_size: int, cache: Path, width: int
) -> None:
    """One memory measurement (run in its own process); prints JSON {"peak_bytes": ...}."""
    tokenizer = small_tokenizer()
    if mode == "sft":  # as many images per step as DPO's chosen + rejected rows
        data = batches(folder, "generation", tokenizer, steps, 2 * batch_size)
    else:
        data = batches(folder, "preference", tokenizer, steps, batch_size)
    baseline = ResidentPeak.current()
    with ResidentPeak() as resident:
        peak = train_one_mode(mode, data, device, cache, width)
    if device.type != "cuda":
        peak = resident.peak - baseline
    print(json.dumps({"peak_bytes": peak}))


def train_one_mode(mode: str, data: list[dict[str, Any]], device: torch.device, cache: Path, width: int) -> int:
    """Build the models of ``mode`` and train (or, for "precompute", write the reference cache); CUDA peak bytes."""
    name = "generation_sft" if mode == "sft" else "dpo"
    config = StageConfig(stage=name, trainable=GENERATION_GROUPS, seed=0,
                         dpo={"corruption": "sample", "precompute_reference": mode != "dpo_resident"})
    if mode == "precompute":
        reference = small_model(width)
        logps = precompute_reference_logps(reference.to(device), [to_device(b, device) for b in data], config)
        cache.write_text(json.dumps({"seed": logps.seed, "corruption": logps.corruption, "values": logps.values}))
        return 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = small_model(width).to(device)
    if mode == "sft":
        module = STAGES[name](model, config)
    elif mode == "dpo_resident":
        reference = small_model(width)
        module = STAGES[name](model, config, reference=reference.to(device))
    else:
        stored = json.loads(cache.read_text())
        values = {key: tuple(value) for key, value in stored["values"].items()}
        cached = ReferenceLogProbs(stored["seed"], stored["corruption"], values)
        module = STAGES[name](model, config, reference_logps=cached)
    train_steps(module, config, data, device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def run_child(mode: str, arguments: argparse.Namespace, folder: Path, cache: Path) -> int:
    command = [sys.executable, __file__, "--child", mode, "--data", str(folder), "--cache", str(cache),
               "--device", arguments.device, "--steps", str(arguments.memory_steps),
               "--batch-size", str(arguments.memory_batch_size), "--width", str(arguments.memory_width)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement {mode!r} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] if mode != "precompute" else 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed throughput steps (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=512, help="LLM and decoder width of the throughput model")
    parser.add_argument("--memory-width", type=int, default=256, help="width of the memory model")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    for name in ("width", "memory_width"):
        width = getattr(arguments, name)
        if width < HEAD_DIM or width % HEAD_DIM:
            parser.error(f"--{name.replace('_', '-')} must be a positive multiple of the head dim {HEAD_DIM}, "
                         f"got {width}")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    if arguments.child is not None:
        peak_memory_child(arguments.child, arguments.data, device, arguments.steps, arguments.batch_size,
                          arguments.cache, arguments.width)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder, cache = Path(scratch) / "data", Path(scratch) / "reference_logps.json"
        write_data(folder)
        speed = measure_throughput(folder, device, arguments.steps, arguments.batch_size, arguments.width)
        sft = run_child("sft", arguments, folder, cache)
        resident = run_child("dpo_resident", arguments, folder, cache)
        run_child("precompute", arguments, folder, cache)
        precomputed = run_child("dpo_precomputed", arguments, folder, cache)
    ratio = speed["achieved"] / speed["matmul"]
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, width {arguments.width} (throughput), "
          f"{arguments.memory_width} (memory)\n")
    print("| measurement | value | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| train step, batch {arguments.batch_size} | {speed['samples_per_s']:.1f} samples/s, "
          f"{speed['achieved'] / 1e9:.2f} GFLOP/s | matmul {speed['matmul'] / 1e9:.2f} GFLOP/s | {ratio:.2f} "
          "| >= 0.50 |")
    for label, value in (("DPO, resident reference", resident), ("DPO, reference log-probs ahead", precomputed)):
        print(f"| peak memory, {label} | {value / 2**20:.0f} MiB | generation SFT {sft / 2**20:.0f} MiB | "
              f"{value / sft:.2f} | <= 1.25 |")


if __name__ == "__main__":
    main()
