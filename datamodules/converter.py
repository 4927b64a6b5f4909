"""Convert the reference's LLaMA-Factory ShareGPT JSON (VARGPT §5) into our WebDataset shards.

    python -m datamodules.converter INPUT.json --images-root DIR --out DIR [--kind auto] [--prefix shard]

Accepted record layouts (a JSON list, or JSON Lines when the file ends in ``.jsonl``):

* ``messages`` with ``role``/``content`` turns plus ``images`` (understanding: ``<image>`` in user turns;
  generation: ``<image_gen>`` in the assistant turn; editing: both, images ``[input, target]``);
* plain ShareGPT ``conversations`` with ``from``/``value`` turns (``human``/``gpt``/``system``) plus ``images``;
* ranking records: a prompt (``conversations`` or ``messages``), ``chosen`` and ``rejected`` assistant messages
  that each hold one ``<image_gen>``, and ``images`` = ``[chosen, rejected]`` (input images of the prompt, if any,
  come first).

An optional top-level ``system`` string becomes the system turn. ``images`` are paths relative to ``--images-root``
(absolute paths are used as they are), listed in order of appearance of the placeholders, as in LLaMA-Factory.

Every record is validated: roles are known and alternate user/assistant after an optional system turn, the kind
matches ``--kind`` (or is inferred), the placeholder count equals the number of images, and every image file exists
and decodes. A record that fails is not written; its index and reason go to ``<out>/<prefix>-rejects.jsonl`` and
the summary line counts it, so no record is lost silently. ``<out>/<prefix>-summary.json`` lists the shards with
their sample counts (useful to size epochs) and the counts per kind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.schema import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, KINDS, Sample, SampleError, placeholder_order
from datamodules.shards import ShardWriter

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_FORMATS = ("png", "jpg")


class RecordError(ValueError):
    """One input record cannot be converted; the message is the reason written to the rejects file."""


@dataclass
class ConversionReport:
    """What a conversion did: counts, the rejects with their reasons, the shards written."""

    records: int = 0
    converted: int = 0
    kinds: Counter = field(default_factory=Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    shard_sample_counts: list[int] = field(default_factory=list)

    def summary_line(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.kinds.items())) or "none"
        return (
            f"converted {self.converted} of {self.records} records into {len(self.shards)} shards "
            f"({kinds}); rejected {len(self.rejects)}"
        )


def load_records(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list of records (JSON Lines for ``.jsonl``); raise ``ValueError`` naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"input file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"input file {str(path)!r} must hold a JSON list of records, got {type(records).__name__}")
    return records


def _turn(raw: Any, where: str) -> dict[str, str]:
    """One message in either ``role``/``content`` or ``from``/``value`` form, as a schema turn."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where} must be an object, got {type(raw).__name__}")
    if "role" in raw or "content" in raw:
        role, content = raw.get("role"), raw.get("content")
    else:
        role, content = raw.get("from"), raw.get("value")
    if role not in SHAREGPT_ROLES:
        raise RecordError(f"{where} has role {role!r}; expected one of {sorted(SHAREGPT_ROLES)}")
    if not isinstance(content, str):
        raise RecordError(f"{where} has no text content (expected 'content' or 'value' string)")
    return {"role": SHAREGPT_ROLES[role], "content": content}


def _check_turn_order(messages: list[dict[str, str]], ends_with: str) -> None:
    """After an optional system turn, roles must alternate user, assistant, ... and end with ``ends_with``."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("no user or assistant turns")
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise RecordError(
                f"turn {index} has role {turn['role']!r} where {expected!r} was expected (roles must alternate)"
            )
    if body[-1]["role"] != ends_with:
        raise RecordError(f"the conversation must end with a {ends_with!r} turn, not {body[-1]['role']!r}")


def infer_kind(messages: list[dict[str, str]], is_ranking: bool) -> str:
    """The schema kind from the placeholders: ranking -> preference; <image> and <image_gen> -> editing; ..."""
    if is_ranking:
        return "preference"
    has_input = any(IMAGE_PLACEHOLDER in turn["content"] for turn in messages)
    has_gen = any(IMAGE_GEN_PLACEHOLDER in turn["content"] for turn in messages)
    if has_gen:
        return "editing" if has_input else "generation"
    return "understanding" if has_input else "text"


def _member_names(placeholders: list[str], kind: str, extension: str) -> list[str]:
    """Conventional member names (schema docstring) for the images in placeholder order."""
    n_gen = placeholders.count(IMAGE_GEN_PLACEHOLDER)
    names, inputs, targets = [], 0, 0
    for placeholder in placeholders:
        if placeholder == IMAGE_PLACEHOLDER:
            names.append(f"input_{inputs}.{extension}")
            inputs += 1
        else:
            names.append(f"target.{extension}" if n_gen == 1 else f"target_{targets}.{extension}")
            targets += 1
    if kind == "preference":
        names += [f"chosen.{extension}", f"rejected.{extension}"]
    return names


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise RecordError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB") if image.mode not in ("RGB", "RGBA", "L") else image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RecordError(f"image file {str(path)!r} does not decode as an image ({error})") from error


def record_to_sample(
    record: Any, key: str, images_root: Path, kind: str = "auto", image_format: str = "png"
) -> Sample:
    """Convert one record into a validated ``Sample``; raise ``RecordError`` with the reason when it cannot."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be an object, got {type(record).__name__}")
    prompt_field = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if prompt_field is None:
        raise RecordError("missing field 'messages' or 'conversations'")
    raw_turns = record[prompt_field]
    if not isinstance(raw_turns, list):
        raise RecordError(f"field {prompt_field!r} must be a list of turns")
    messages = [_turn(raw, f"{prompt_field}[{index}]") for index, raw in enumerate(raw_turns)]
    if isinstance(record.get("system"), str) and record["system"]:
        if messages and messages[0]["role"] == "system":
            raise RecordError("both a 'system' field and a system turn are given")
        messages.insert(0, {"role": "system", "content": record["system"]})
    for index, turn in enumerate(messages):
        if IMAGE_GEN_PLACEHOLDER in turn["content"] and turn["role"] != "assistant":
            raise RecordError(f"turn {index} ({turn['role']}) holds {IMAGE_GEN_PLACEHOLDER}; only assistant turns may")
        if IMAGE_PLACEHOLDER in turn["content"] and turn["role"] != "user":
            raise RecordError(f"turn {index} ({turn['role']}) holds {IMAGE_PLACEHOLDER}; only user turns may")
    is_ranking = "chosen" in record or "rejected" in record
    inferred = infer_kind(messages, is_ranking)
    if kind != "auto" and kind != inferred:
        raise RecordError(f"record looks like kind {inferred!r} but --kind {kind!r} was asked for")
    chosen = rejected = None
    if is_ranking:
        for name in ("chosen", "rejected"):
            if name not in record:
                raise RecordError(f"ranking record lacks {name!r}")
        chosen, rejected = _turn(record["chosen"], "chosen"), _turn(record["rejected"], "rejected")
        for name, turn in (("chosen", chosen), ("rejected", rejected)):
            if turn["role"] != "assistant":
                raise RecordError(f"{name!r} must be an assistant message, got role {turn['role']!r}")
            if turn["content"].count(IMAGE_GEN_PLACEHOLDER) != 1 or IMAGE_PLACEHOLDER in turn["content"]:
                raise RecordError(f"{name!r} must hold exactly one {IMAGE_GEN_PLACEHOLDER} and no {IMAGE_PLACEHOLDER}")
        _check_turn_order(messages, ends_with="user")
    else:
        _check_turn_order(messages, ends_with="assistant")
    raw_images = record.get("images", [])
    if not isinstance(raw_images, list) or not all(isinstance(path, str) for path in raw_images):
        raise RecordError("field 'images' must be a list of file paths")
    placeholders = placeholder_order(messages)
    names = _member_names(placeholders, inferred, image_format)
    if len(raw_images) != len(names):
        raise RecordError(
            f"the messages need {len(names)} images ({placeholders.count(IMAGE_PLACEHOLDER)} <image>, "
            f"{placeholders.count(IMAGE_GEN_PLACEHOLDER)} <image_gen>"
            + (", chosen, rejected" if is_ranking else "") + f") but 'images' lists {len(raw_images)}"
        )
    images = {name: _open_image(images_root / path) for name, path in zip(names, raw_images)}
    metadata = {"source_images": raw_images}
    if "id" in record:
        metadata["id"] = record["id"]
    sample = Sample(key=key, kind=inferred, messages=messages, images=images, metadata=metadata,
                    chosen=chosen, rejected=rejected)
    try:
        sample.validate()
    except SampleError as error:
        raise RecordError(str(error)) from error
    return sample


def convert_records(
    records: Sequence[Any],
    images_root: Path,
    writer: ShardWriter,
    kind: str = "auto",
    image_format: str = "png",
    source: str = "input",
) -> ConversionReport:
    """Convert every record, write the good ones with ``writer`` and collect each reject with index and reason."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected 'auto' or one of {KINDS}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {IMAGE_FORMATS}")
    report = ConversionReport(records=len(records))
    for index, record in enumerate(records):
        try:
            sample = record_to_sample(record, f"{index:09d}", images_root, kind, image_format)
            sample.metadata.update(source=source, record_index=index)
            writer.write(sample)
        except (RecordError, SampleError) as error:
            reject: dict[str, Any] = {"index": index, "reason": str(error)}
            if isinstance(record, dict) and "id" in record:
                reject["id"] = record["id"]
            report.rejects.append(reject)
            continue
        report.converted += 1
        report.kinds[sample.kind] += 1
    return report


def convert_file(
    input_path: Path,
    images_root: Path,
    out: Path,
    kind: str = "auto",
    prefix: str = "shard",
    max_samples: int = 1000,
    image_format: str = "png",
) -> ConversionReport:
    """Convert one JSON file into shards in ``out``, with the rejects file and the summary next to them."""
    records = load_records(input_path)
    with ShardWriter(out, prefix=prefix, max_samples=max_samples) as writer:
        report = convert_records(records, images_root, writer, kind, image_format, source=input_path.name)
    report.shards = list(writer.paths)
    report.shard_sample_counts = list(writer.shard_sample_counts)
    with open(out / f"{prefix}-rejects.jsonl", "w", encoding="utf-8") as rejects_file:
        for reject in report.rejects:
            rejects_file.write(json.dumps(reject, ensure_ascii=False) + "\n")
    summary = {
        "source": input_path.name,
        "records": report.records,
        "converted": report.converted,
        "rejected": len(report.rejects),
        "kinds": dict(report.kinds),
        "shards": [
            {"name": path.name, "samples": count} for path, count in zip(report.shards, report.shard_sample_counts)
        ],
    }
    (out / f"{prefix}-summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0, or 1 when ``--strict`` and any record was rejected."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.converter", description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="LLaMA-Factory ShareGPT JSON list (or .jsonl)")
    parser.add_argument("--images-root", type=Path, required=True, help="folder the 'images' paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    parser.add_argument("--kind", default="auto", choices=("auto", *KINDS), help="expected kind (default: infer)")
    parser.add_argument("--prefix", default="shard", help="shard name prefix: PREFIX-000000.tar")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", default="png", choices=IMAGE_FORMATS, help="png (lossless) or jpg (q95)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any record is rejected")
    args = parser.parse_args(argv)
    try:
        report = convert_file(
            args.input, args.images_root, args.out, args.kind, args.prefix, args.max_samples_per_shard,
            args.image_format,
        )
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    for reject in report.rejects[:10]:
        print(f"rejected record {reject['index']}: {reject['reason']}", file=sys.stderr)
    if len(report.rejects) > 10:
        print(f"... {len(report.rejects) - 10} more in {args.out / (args.prefix + '-rejects.jsonl')}", file=sys.stderr)
    print(report.summary_line())
    return 1 if args.strict and report.rejects else 0


if __name__ == "__main__":
    sys.exit(main())
