"""CLIP score of generated images against their prompts (torchmetrics' definition, transformers CLIP, local folder).

Per image: ``max(100 * cos(image embedding, text embedding), 0)``; the score is the mean over images (and per
category subfolder, for MJHQ-30K-style folders). Prompts come from a file:

* ``.json``: an object mapping an image's file stem to its prompt, or to an object with a ``prompt`` field (the
  shape of MJHQ-30K's ``meta_data.json``, whose keys are the image ids);
* ``.jsonl``: one ``{"image": <file name or stem>, "prompt": <text>}`` per line.

Every image must have a prompt (an image without one is an error); prompts without an image are counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from vargpt.eval.clip_model import ClipEncoder
from vargpt.eval.fidelity import ImageSetError, list_images
from vargpt.eval.jsonl import read_jsonl

LOGIT_SCALE = 100.0  # torchmetrics CLIPScore: 100 * cosine similarity, clamped at 0


def read_prompt_table(path: str | os.PathLike) -> dict[str, str]:
    """Image stem -> prompt from a ``.json`` object or ``.jsonl`` file (formats in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for number, record in enumerate(read_jsonl(path), start=1):
            if not isinstance(record.get("image"), str) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected string fields 'image' and 'prompt'")
            table[Path(record["image"]).stem] = record["prompt"]
        return table
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image stems to prompts")
    for key, value in raw.items():
        prompt = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: entry {key!r} has no string prompt")
        table[Path(key).stem] = prompt
    return table


def clip_score_folder(
    encoder: ClipEncoder,
    images_dir: str | os.PathLike,
    prompts: dict[str, str],
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean CLIP score over every image of ``images_dir`` (recursively), overall and per first-level subfolder."""
    root = Path(images_dir)
    paths = list_images(root, recursive=True)
    stems = [p.stem for p in paths]
    duplicates = sorted(stem for stem, count in Counter(stems).items() if count > 1)
    if duplicates:
        raise ImageSetError(f"image names must be unique to look up prompts; repeated: {duplicates[:5]}")
    missing = [p.name for p in paths if p.stem not in prompts]
    if missing:
        raise ImageSetError(f"{len(missing)} image(s) have no prompt in the prompt file, e.g. {missing[:5]}")
    scores: list[float] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="clip score", disable=not progress):
        batch = paths[start : start + batch_size]
        images = [Image.open(p).convert("RGB") for p in batch]
        image_embeddings = encoder.encode_images(images, batch_size=batch_size)
        text_embeddings = encoder.encode_texts([prompts[p.stem] for p in batch], batch_size=batch_size)
        cosine = (image_embeddings * text_embeddings).sum(dim=-1)
        scores.extend(torch.clamp(LOGIT_SCALE * cosine, min=0).tolist())
    by_category: dict[str, list[float]] = defaultdict(list)
    for path, score in zip(paths, scores, strict=True):
        relative = path.relative_to(root)
        if len(relative.parts) > 1:
            by_category[relative.parts[0]].append(score)
    return {
        "clip_score": sum(scores) / len(scores),
        "n": len(scores),
        "prompts_without_image": len(set(prompts) - set(stems)),
        "categories": {name: {"clip_score": sum(v) / len(v), "n": len(v)} for name, v in sorted(by_category.items())},
        "clip_folder": encoder.folder.name,
    }
