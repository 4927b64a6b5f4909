"""Inference from the command line, for people who only want to use a model.

    python -m vargpt.infer chat --model DIR --image IMG --prompt "What is in this picture?"
    python -m vargpt.infer generate --model DIR --prompt "a red circle" --out DIR --seed 0 [--prompts-file F]
    python -m vargpt.infer edit --model DIR --image IMG --prompt "make it blue" --out DIR

``--model`` is our export or the released VARGPT-v1.1 folder (``vargpt.checkpoints.vargpt.from_pretrained``).
Images are written into ``--out`` as ``{index:04d}-{slug of the prompt}-seed{seed}.png`` next to a JSON sidecar
with the prompt, seed and every sampling setting. The slug keeps only ``[a-z0-9-]``, so no prompt can name a path
outside ``--out`` (``../../etc/passwd`` becomes ``etc-passwd``). Sampling defaults are the reference's (VARGPT §2.4):
cfg 3, temperature 0.5, top-p 0.97; prompt i gets seed ``--seed + i``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vargpt.chat import IMAGE_PLACEHOLDER
from vargpt.config import SamplingConfig

SLUG_MAX_CHARS = 60
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_SAMPLING = SamplingConfig()  # VARGPT §2.4


class InferenceError(ValueError):
    """Bad command-line input (a missing file, an empty prompt list, ...); the message names it."""


def slugify(prompt: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A file-name-safe slug of ``prompt``: lowercase ASCII letters and digits joined by single hyphens."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = "-".join(words)[:max_chars].strip("-")
    return slug or "image"


def output_stem(prompt: str, index: int, seed: int) -> str:
    """The file name (without extension) of image ``index``: never contains a path separator or ``..``."""
    return f"{index:04d}-{slugify(prompt)}-seed{seed}"


def safe_output_path(out_dir: Path, stem: str, suffix: str) -> Path:
    """``out_dir / (stem + suffix)``, checked to resolve inside ``out_dir``."""
    path = (out_dir / f"{stem}{suffix}").resolve()
    if path.parent != out_dir.resolve():
        raise InferenceError(f"output name {stem!r} would leave the output folder {out_dir}")
    return path


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values followed by the non-blank lines of ``--prompts-file``."""
    collected = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InferenceError(f"prompts file not found: {path}")
        collected += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not collected:
        raise InferenceError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return collected


def load_image(path: str) -> Any:
    """An RGB PIL image; a missing or unreadable file is an ``InferenceError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise InferenceError(f"image not found: {file}")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InferenceError(f"cannot read image {file}: {error}") from error


def load_model(folder: str, device: str, dtype: str | None) -> Any:
    """The model of ``folder`` with its text tokenizer (required for inference)."""
    from vargpt.checkpoints.vargpt import from_pretrained

    model, tokenizer = from_pretrained(folder, device=device, dtype=DTYPES[dtype] if dtype else None)
    if tokenizer is None:
        raise InferenceError(f"model folder {folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return model


def resolve_schedule(model: Any, pn: str | None, size: int | None, aspect: float) -> list[tuple[int, int]]:
    """The scale schedule: ``--size`` (square pixels), else ``--pn`` at ``--aspect``, else the model config's."""
    from vargpt.schedules import scale_schedule, schedule_for_latent

    if size is not None:
        stride = model.config.tokenizer.stride
        if size < stride or size % stride:
            raise InferenceError(f"--size {size} must be a positive multiple of the VAE stride {stride}")
        return schedule_for_latent(size // stride, size // stride)
    if pn is not None:
        return scale_schedule(pn, aspect)
    return model.config.schedule


def write_images(
    images: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], first_index: int, out_dir: Path,
    settings: dict[str, Any],
) -> list[Path]:
    """Save each image and its JSON sidecar; returns the image paths."""
    written = []
    for offset, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        stem = output_stem(prompt, first_index + offset, seed)
        path = safe_output_path(out_dir, stem, ".png")
        image.save(path)
        sidecar = {
            "prompt": prompt, "seed": seed, "index": first_index + offset, "image": path.name,
            "width": image.width, "height": image.height, **settings,
        }
        safe_output_path(out_dir, stem, ".json").write_text(json.dumps(sidecar, indent=2))
        written.append(path)
    return written


def run_generation(args: argparse.Namespace, model: Any, input_image: Any | None) -> list[Path]:
    """``generate`` / ``edit``: images for every prompt, ``--batch-size`` at a time."""
    from vargpt.generation import generate_images

    prompts = read_prompts(args.prompt, getattr(args, "prompts_file", None))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule = resolve_schedule(model, args.pn, args.size, args.aspect)
    sampling = {"cfg": args.cfg, "temperature": args.temperature, "top_p": args.top_p}
    settings = {
        "command": args.command, "model": str(args.model), **sampling, "pn": args.pn, "size": args.size,
        "aspect": args.aspect, "schedule": [list(scale) for scale in schedule],
    }
    if input_image is not None:
        settings["input_image"] = str(args.image[0])
    written: list[Path] = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        images = [input_image] * len(batch) if input_image is not None else None
        outputs = generate_images(model, batch, seed=seeds, images=images, schedule=schedule, **sampling)
        written += write_images(outputs, batch, seeds, start, out_dir, settings)
    return written


def run_chat(args: argparse.Namespace, model: Any) -> str:
    """``chat``: the assistant's answer about ``--image`` (placeholders are prepended when the prompt has none)."""
    images = [load_image(path) for path in args.image]
    prompt = " ".join(args.prompt)
    if images and IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER * len(images) + "\n" + prompt
    return model.chat([{"role": "user", "content": prompt}], images=images or None, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vargpt.infer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help="model folder (our export or the released VARGPT-v1.1)")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")

    def sampling(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--out", required=True, help="output folder for the images and their JSON sidecars")
        sub.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
        sub.add_argument("--cfg", type=float, default=REFERENCE_SAMPLING.cfg)
        sub.add_argument("--temperature", type=float, default=REFERENCE_SAMPLING.temperature)
        sub.add_argument("--top-p", type=float, default=REFERENCE_SAMPLING.top_p)
        sub.add_argument("--pn", default=None, help="resolution preset (0.06M = 256 px, 0.25M = 512 px)")
        sub.add_argument("--size", type=int, default=None, help="square image side in pixels (overrides --pn)")
        sub.add_argument("--aspect", type=float, default=1.0, help="h / w for --pn")
        sub.add_argument("--batch-size", type=int, default=1)

    chat = commands.add_parser("chat", help="answer a question about images")
    common(chat)
    chat.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    chat.add_argument("--prompt", action="append", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=512)

    generate = commands.add_parser("generate", help="text-to-image")
    common(generate)
    sampling(generate)
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompts-file", default=None, help="one prompt per line")

    edit = commands.add_parser("edit", help="edit an image following an instruction")
    common(edit)
    sampling(edit)
    edit.add_argument("--image", action="append", required=True, help="the input image")
    edit.add_argument("--prompt", action="append", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``error: ...`` naming it and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "batch_size", 1) < 1:
            raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.command == "edit" and len(args.image) != 1:
            raise InferenceError(f"edit takes exactly one --image, got {len(args.image)}")
        if args.command in ("chat", "edit"):
            for path in args.image:
                load_image(path)
        if args.command == "generate":
            read_prompts(args.prompt, args.prompts_file)
        model = load_model(args.model, args.device, args.dtype)
        if args.command == "chat":
            print(run_chat(args, model))
        else:
            image = load_image(args.image[0]) if args.command == "edit" else None
            for path in run_generation(args, model, image):
                print(path)
    except (InferenceError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
