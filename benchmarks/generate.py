"""End-to-end ``VARGPT.generate_images`` throughput of a tiny-but-not-trivial model, and where the time goes.

The model is random (no weights are loaded): Qwen2-VL with ``--llm-layers`` x ``--llm-width``, an Infinity decoder of
``--decoder-depth`` x ``--decoder-width``, a BSQ-VAE of stride 8, and a local BPE tokenizer. Images are 128 px with
the 0.06M-shaped schedule (7 scales, 1..16, 521 tokens) and classifier-free guidance, so every scale runs the
conditional and the empty-prompt rows as one LLM batch and one decoder batch.

The breakdown times, per scale, the LLM call (``backbone.language_model``) and the decoder step
(``decoder.step``) with wall-clock timers around those calls (synchronising CUDA); "other" is the rest (prompt
encoding, projectors, bit sampling, code accumulation, the VAE decoder). Timings are medians over repeats after a
warm-up run.

Example: ``python benchmarks/generate.py`` or ``python benchmarks/generate.py --device cuda --batch-sizes 1 8 32``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from vargpt.chat import ChatTokenIds
from vargpt.config import DecoderConfig, TokenizerConfig, VARGPTConfig
from vargpt.model import VARGPT
from vargpt.schedules import token_count
from vargpt.text_tokenizer import train_text_tokenizer

SCHEDULE = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16]]  # 0.06M's shape at VAE stride 8 -> 128 px
PROMPTS = ("a red circle on a blue square", "two green triangles next to a yellow star", "a big purple hexagon")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--llm-width", type=int, default=256)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-width", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> VARGPT:
    """A random model of the requested size with a local tokenizer attached."""
    tokenizer = train_text_tokenizer(PROMPTS, vocab_size=512)
    ids = ChatTokenIds.from_tokenizer(tokenizer)
    heads = max(1, args.llm_width // 64)
    qwen2_vl = {
        "text_config": {
            "hidden_size": args.llm_width, "num_hidden_layers": args.llm_layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": 4 * args.llm_width, "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            "pad_token_id": ids.pad, "bos_token_id": ids.pad, "eos_token_id": ids.im_end,
        },
        "vision_config": {"depth": 1, "embed_dim": 64, "num_heads": 2, "hidden_size": args.llm_width},
        "image_token_id": ids.image_pad, "video_token_id": ids.image_pad + 1,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
    }
    config = VARGPTConfig(
        qwen2_vl=qwen2_vl,
        decoder=DecoderConfig(
            depth=args.decoder_depth, width=args.decoder_width, heads=max(1, args.decoder_width // 64), bits=16,
            condition_dim=args.decoder_width, drop_path=0.0,
        ),
        tokenizer=TokenizerConfig(bits=16, base_channels=32, encoder_channel_multipliers=[1, 1, 2, 2],
                                  decoder_channel_multipliers=[1, 1, 2, 2], encoder_res_blocks=1, decoder_res_blocks=1),
        generation_schedule=SCHEDULE,
        image_gen_start_token_id=ids.image_gen_start, image_gen_end_token_id=ids.image_gen_end,
        image_gen_pad_token_id=ids.image_gen_pad, im_start_token_id=ids.im_start, im_end_token_id=ids.im_end,
        pad_token_id=ids.pad,
    )
    model = VARGPT(config).to(args.device).eval()
    model.attach_tokenizer(tokenizer)
    return model


class CallTimer:
    """Accumulates wall-clock time of wrapped calls under a key chosen per call."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: dict[tuple[str, int], float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def wrap(self, function: Callable[..., Any], key: Callable[..., tuple[str, int]]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self._sync()
            self.seconds[key(*args, **kwargs)] += time.perf_counter() - start
            return result

        return timed


def instrument(model: VARGPT, timer: CallTimer) -> Callable[[], None]:
    """Time every LLM call (call 0 is the prompt, call k + 1 scale k) and every decoder step, per scale.

    Returns the function that restarts the LLM call count (call it before each ``generate_images``)."""
    llm_calls = {"count": 0}

    def llm_key(*args: Any, **kwargs: Any) -> tuple[str, int]:
        index = llm_calls["count"]
        llm_calls["count"] += 1
        return ("llm", index - 1)  # -1 = the prompt prefill

    def decoder_key(x_k: torch.Tensor, scale_index: int, *args: Any, **kwargs: Any) -> tuple[str, int]:
        return ("decoder", scale_index)

    model.backbone.language_model.forward = timer.wrap(model.backbone.language_model.forward, llm_key)
    model.decoder.step = timer.wrap(model.decoder.step, decoder_key)
    return lambda: llm_calls.update(count=0)


def run(
    model: VARGPT, batch_size: int, args: argparse.Namespace, timer: CallTimer, reset: Callable[[], None]
) -> tuple[float, dict]:
    """Median seconds of one ``generate_images`` call of ``batch_size`` prompts, and that run's timed parts."""
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(batch_size)]
    for _ in range(args.warmup):
        reset()
        model.generate_images(prompts, cfg=args.cfg, seed=list(range(batch_size)))
    totals, parts = [], []
    for _ in range(args.repeats):
        timer.seconds.clear()
        reset()
        start = time.perf_counter()
        model.generate_images(prompts, cfg=args.cfg, seed=list(range(batch_size)))
        totals.append(time.perf_counter() - start)
        parts.append(dict(timer.seconds))
    median = statistics.median(totals)
    chosen = parts[totals.index(median)]
    return median, chosen


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args)
    timer = CallTimer(args.device)
    reset = instrument(model, timer)
    tokens = token_count(SCHEDULE)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device {args.device}, {params:.1f} M parameters, LLM {args.llm_layers}x{args.llm_width}, decoder "
          f"{args.decoder_depth}x{args.decoder_width}, {len(SCHEDULE)} scales / {tokens} tokens, cfg {args.cfg}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| batch | s / batch | images / s | LLM s | decoder s | other s |")
    print("|---|---|---|---|---|---|")
    breakdowns = {}
    for batch_size in args.batch_sizes:
        total, parts = run(model, batch_size, args, timer, reset)
        llm = sum(v for (kind, _), v in parts.items() if kind == "llm")
        decoder = sum(v for (kind, _), v in parts.items() if kind == "decoder")
        print(f"| {batch_size} | {total:.3f} | {batch_size / total:.2f} | {llm:.3f} | {decoder:.3f} | "
              f"{total - llm - decoder:.3f} |")
        breakdowns[batch_size] = parts
    for batch_size, parts in breakdowns.items():
        print(f"\nPer scale, batch {batch_size} (ms; scale -1 = prompt prefill):\n")
        print("| scale | h x w | LLM ms | decoder ms |")
        print("|---|---|---|---|")
        print(f"| prompt | - | {parts.get(('llm', -1), 0.0) * 1e3:.1f} | - |")
        for k, (h, w) in enumerate(SCHEDULE):
            print(f"| {k} | {h}x{w} | {parts.get(('llm', k), 0.0) * 1e3:.1f} | "
                  f"{parts.get(('decoder', k), 0.0) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
