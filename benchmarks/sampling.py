"""Bit-generation speed of the Infinity decoder: KV cache vs recomputing the prefix, and achieved FLOP/s.

For each schedule and batch size it times ``generate_bits`` (KV cache, one step per scale) and
``generate_bits_uncached`` (the teacher-forced forward over scales 0..k at every scale k), with classifier-free
guidance (2B rows per step). Only bits are generated: no text encoder, no VAE. Timings are medians over repeats
after warm-up runs.

FLOPs of the cached path are counted analytically (2 FLOPs per multiply-add of every matmul; norms, softmax,
RoPE, resizing and sampling are not counted):
* per token and block: qkv 3C^2, self-attention output C^2, cross-attention q C^2 and output C^2, FFN 2 C F
  (F = FFN hidden); per token: word embedding d C and the head 2 C d;
* attention per block: self-attention 2 n_k cum_k C for scale k (q k^T and weights x v, over the cached prefix of
  cum_k tokens), cross-attention 2 n_k T C (all in multiply-adds);
* once per generation: context keys/values 2 T Cc C per block, the shared AdaLN D 6C and the head AdaLN D 2C per row.
The achieved FLOP/s are compared with a plain ``torch.matmul`` of the same width (M x C times C x C) timed in the
same run, so the ratio is meaningful on any machine. "FLOP ratio" is the uncached path's matmul FLOPs over the
cached path's: the speed-up a perfectly efficient implementation of both would show.

Example: ``python benchmarks/sampling.py --quick`` or ``python benchmarks/sampling.py --device cuda --dtype bf16``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from vargpt.config import DecoderConfig, SamplingConfig
from vargpt.decoder import DecoderCondition, InfinityDecoder
from vargpt.sampling import generate_bits, generate_bits_uncached
from vargpt.schedules import scale_schedule, token_count
from timing import timed_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the matmuls")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--condition-dim", type=int, default=512)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=64, help="context length T of every prompt")
    parser.add_argument("--pn", nargs="+", default=["0.06M", "0.25M"], help="1:1 schedules (7 and 10 scales)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the uncached path (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="only 0.06M, batch 1 and 8, one timed run each")
    args = parser.parse_args()
    if args.quick:
        args.pn, args.repeats, args.baseline_repeats, args.warmup = ["0.06M"], 1, 1, 1
    return args


def median_seconds(run: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of ``run`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    return statistics.median(timed_calls(run, repeats, device))


def cached_generation_flops(config: DecoderConfig, schedule: list[tuple[int, int]], rows: int, text_tokens: int) -> int:
    """Matmul FLOPs of one KV-cached generation of ``rows`` sequences (CFG counts both halves), see the module doc."""
    width, bits, hidden = config.width, config.bits, config.mlp_hidden
    length = token_count(schedule)
    per_token_block = 6 * width * width + 2 * width * hidden
    per_token = config.depth * per_token_block + 3 * bits * width
    attention, cumulative = 0, 0
    for h, w in schedule:
        cumulative += h * w
        attention += 2 * h * w * cumulative * width + 2 * h * w * text_tokens * width  # multiply-adds
    per_row = 2 * (length * per_token + config.depth * attention + 8 * width * width)
    context = 2 * config.depth * text_tokens * config.context_dim * 2 * width
    return rows * (per_row + context)


def uncached_generation_flops(
    config: DecoderConfig, schedule: list[tuple[int, int]], rows: int, text_tokens: int
) -> int:
    """Matmul FLOPs of the uncached baseline: at scale k, a full forward over the L_k tokens of scales 0..k.

    The masked self-attention kernel computes all L_k^2 query-key pairs (the block-causal mask only hides them),
    and the context keys/values and AdaLN inputs are recomputed at every scale.
    """
    total = 0
    for k in range(len(schedule)):
        prefix = schedule[: k + 1]
        length = token_count(prefix)
        # the block-causal pairs sum n_j * cum_j; the kernel does all length^2 of them, which adds the difference
        hidden_pairs = length * length - sum(h * w * token_count(prefix[: j + 1]) for j, (h, w) in enumerate(prefix))
        total += cached_generation_flops(config, prefix, rows, text_tokens)
        total += rows * 2 * config.depth * 2 * hidden_pairs * config.width
    return total


def matmul_flops_per_second(width: int, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> float:
    """FLOP/s of a plain (M x C) @ (C x C) matmul, M = 4096 (the reference point for the decoder's matmuls)."""
    rows = 4096
    a = torch.randn(rows, width, device=device)
    b = torch.randn(width, width, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run() -> torch.Tensor:
        with autocast:
            out = a
            for _ in range(8):
                out = torch.matmul(out, b)
            return out

    seconds = median_seconds(run, warmup, max(repeats, 3), device)
    return 8 * 2 * rows * width * width / seconds


def random_conditions(decoder: InfinityDecoder, batch: int, text_tokens: int, device: torch.device):
    """A conditional and an unconditional condition with full-length contexts of ``text_tokens``."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, text_tokens, decoder.config.condition_dim, generator=generator).to(device)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    with torch.no_grad():
        condition = decoder.encode_text(tokens, mask)
        unconditional = decoder.encode_text(*decoder.unconditional_tokens([text_tokens] * batch))
    return condition, unconditional


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = DecoderConfig(
        depth=args.depth,
        width=args.width,
        heads=args.heads,
        bits=args.bits,
        condition_dim=args.condition_dim,
        text_max_tokens=max(args.text_tokens, 1),
        drop_path=0.0,
    )
    torch.manual_seed(0)
    decoder = InfinityDecoder(config).to(device).eval()
    sampling = SamplingConfig(cfg=args.cfg)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    rows_per_sample = 1 if args.cfg == 1.0 else 2

    matmul_rate = matmul_flops_per_second(config.width, device, dtype, args.warmup, args.repeats)
    print(
        f"decoder: depth {config.depth}, width {config.width}, heads {config.heads}, condition_dim "
        f"{config.condition_dim}, d {config.bits}, FFN {config.mlp_hidden}; T = {args.text_tokens} text tokens; "
        f"cfg {args.cfg}; device {device}, {args.dtype}, {torch.get_num_threads()} CPU threads"
    )
    width = config.width
    print(f"plain torch.matmul (4096 x {width}) @ ({width} x {width}): {matmul_rate / 1e9:.1f} GFLOP/s\n")
    print("| schedule | scales | batch | cached s | uncached s | cached img/s | uncached img/s | speed-up "
          "| FLOP ratio | cached GFLOP/s | vs matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pn in args.pn:
        schedule = scale_schedule(pn, 1.0)
        for batch in args.batch_sizes:
            condition, unconditional = random_conditions(decoder, batch, args.text_tokens, device)
            seeds = list(range(batch))

            def cached(condition: DecoderCondition = condition, unconditional: DecoderCondition = unconditional):
                with autocast:
                    return generate_bits(decoder, condition, schedule, sampling, seeds, unconditional)

            def uncached(condition: DecoderCondition = condition, unconditional: DecoderCondition = unconditional):
                with autocast:
                    return generate_bits_uncached(decoder, condition, schedule, sampling, seeds, unconditional)

            cached_s = median_seconds(cached, args.warmup, args.repeats, device)
            uncached_s = median_seconds(uncached, 0, args.baseline_repeats, device)
            rows = rows_per_sample * batch
            flops = cached_generation_flops(config, schedule, rows, args.text_tokens)
            flop_ratio = uncached_generation_flops(config, schedule, rows, args.text_tokens) / flops
            rate = flops / cached_s
            print(
                f"| {pn} | {len(schedule)} | {batch} | {cached_s:.3f} | {uncached_s:.3f} | {batch / cached_s:.2f} "
                f"| {batch / uncached_s:.2f} | {uncached_s / cached_s:.1f}x | {flop_ratio:.1f}x | {rate / 1e9:.1f} "
                f"| {rate / matmul_rate:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
