"""Score benchmark outputs, or generate them with a model first: ``python evaluate.py BENCHMARK [options]``.

Benchmarks that need no model, only its outputs:

* ``geneval --images DIR --metadata FILE --detector DIR --clip DIR`` scores a GenEval folder (official layout,
  png or jpg, from any model) with transformers' Mask2Former and CLIP; ``--rewritten-images DIR --rewrites FILE``
  scores a second folder generated from rewritten prompts, reported separately.
* ``fid --real DIR --fake DIR --inception FILE`` computes FID / KID / IS (``--mjhq`` for category subfolders).
* ``clipscore --images DIR --prompts FILE --clip DIR``.
* ``mmbench | seed | mmmu | pope | mme --data FILE --predictions FILE`` scores predictions (JSON lines
  ``{"id", "answer"}``) against the benchmark's local VLMEvalKit TSV.

Every run writes ``<out>/<benchmark>.json`` and ``<out>/<benchmark>.md`` and prints the Markdown table. Runs are
resumable: GenEval detections and Inception features are cached under ``<out>``.

With ``--ckpt DIR`` (our export or the released VARGPT-v1.1 folder) the outputs are generated first, then scored:

* ``geneval --ckpt DIR --metadata FILE ...`` writes ``--samples-per-prompt`` images per prompt (4, as GenEval) into
  ``--images`` (default ``<out>/geneval_images``) in the official layout with per-image seeds; images already there
  are kept, so an interrupted run resumes. With ``--rewrites`` the rewritten prompts get their own folder. With
  ``--shard i/n``, n processes split the generation by prompt (i, i + n, ...; the same per-image seeds); a process
  scores its shard only once every image is there, else it reports what is missing (rerun it to score).
* ``fid --ckpt DIR --prompts FILE`` / ``clipscore --ckpt DIR --prompts FILE`` generate one image per prompt-table
  entry (``<stem>.png``; ``fid --mjhq`` puts each into its ``category`` subfolder), skipping existing files.
* ``mmbench | seed | mmmu | pope | mme --ckpt DIR --data FILE`` answer greedily into ``--predictions`` (default
  ``<out>/<benchmark>_predictions.jsonl``, resumable).
* ``shapes --ckpt DIR [--per-task N] [--seed S] [--size PX]``: the shapes benchmark (``vargpt.eval.shapes``).

``--device``, ``--dtype``, ``--batch-size`` and the sampling options ``--cfg / --cfg-schedule / --temperature /
--top-p / --pn / --size`` go to the model (defaults: the checkpoint config's, VARGPT §2.4).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from vargpt.config import CFG_SCHEDULES
from vargpt.eval.geneval import BASE_SEED, SAMPLES_PER_PROMPT, GenEvalListing
from vargpt.eval.report import Report, report_markdown, write_report
from vargpt.eval.understanding.runner import UNDERSTANDING_BENCHMARKS

if TYPE_CHECKING:  # heavy imports (torch) only where a model is loaded
    from vargpt.eval.model_adapters import GenerationSettings, VARGPTImageGenerator
    from vargpt.model import VARGPT

DEFAULT_OUT = Path("runs") / "eval"
DTYPES = ("float32", "bfloat16", "float16")
SHAPES_PARTS = ("generation", "understanding", "editing")  # vargpt.eval.shapes.PARTS, without importing torch here


class EvaluationInputError(ValueError):
    """The command's inputs do not fit together; the message says which and why."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from error
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return index, count


def require(args: argparse.Namespace, **options: str) -> None:
    """Without ``--ckpt`` the outputs must exist: every named option (dest -> flag) is required."""
    missing = [flag for dest, flag in options.items() if getattr(args, dest) is None]
    if missing:
        raise EvaluationInputError(f"{', '.join(missing)} required without --ckpt (or give --ckpt to generate)")


def load_checkpoint(args: argparse.Namespace) -> VARGPT:
    """The ``--ckpt`` model on ``--device`` in ``--dtype`` (default: the checkpoint's)."""
    import torch

    from vargpt.eval.model_adapters import load_model

    return load_model(args.ckpt, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The sampling and resolution options of the command."""
    from vargpt.eval.model_adapters import GenerationSettings

    return GenerationSettings(
        cfg=args.cfg, temperature=args.temperature, top_p=args.top_p, pn=args.pn, size=args.size, aspect=args.aspect,
        cfg_schedule=args.cfg_schedule,
    )


def image_generator(args: argparse.Namespace) -> VARGPTImageGenerator:
    """The ``--ckpt`` model as an ``ImageGenerator`` with the command's batch size and sampling settings."""
    from vargpt.eval.model_adapters import VARGPTImageGenerator

    return VARGPTImageGenerator(load_checkpoint(args), args.batch_size, generation_settings(args))


def model_settings(args: argparse.Namespace) -> dict:
    """What generated outputs depend on, for the report."""
    return {"ckpt": Path(args.ckpt).name, **generation_settings(args).to_dict(), "batch_size": args.batch_size}


def write_geneval_shard(
    generator: VARGPTImageGenerator,
    metadata: Sequence[dict],
    out_dir: Path,
    samples_per_prompt: int,
    base_seed: int,
    prompts: Sequence[str] | None,
    shard: tuple[int, int],
    progress: bool,
) -> dict[str, int]:
    """``write_geneval_samples`` for the prompts of shard ``i`` of ``n`` only (prompt indices i, i + n, ...): the
    same folders, metadata and per-image seeds as an unsharded run, so n processes together write the same folder."""
    from tqdm import tqdm

    from vargpt.eval.geneval import METADATA_FILENAME, SAMPLES_DIRNAME, sample_seed

    index, count = shard
    counts = {"generated": 0, "reused": 0}
    for prompt_index in tqdm(range(index, len(metadata), count), desc=f"geneval generate {index}/{count}",
                             disable=not progress):
        record = metadata[prompt_index]
        text = record["prompt"] if prompts is None else prompts[prompt_index]
        samples = out_dir / f"{prompt_index:05d}" / SAMPLES_DIRNAME
        missing = [k for k in range(samples_per_prompt) if not (samples / f"{k:05d}.png").is_file()]
        counts["reused"] += samples_per_prompt - len(missing)
        if not missing:
            continue
        images = generator.generate_images([text] * len(missing), [sample_seed(prompt_index, k, base_seed)
                                                                   for k in missing])
        if len(images) != len(missing):
            raise ValueError(f"the generator returned {len(images)} images for {len(missing)} requests")
        entry = dict(record) if text == record["prompt"] else {**record, "generation_prompt": text}
        samples.mkdir(parents=True, exist_ok=True)
        (samples.parent / METADATA_FILENAME).write_text(json.dumps(entry), encoding="utf-8")
        for k, image in zip(missing, images, strict=True):
            partial = samples / f".{k:05d}.png.part"  # another shard's scorer never sees a half-written image
            image.save(partial, format="PNG")
            partial.replace(samples / f"{k:05d}.png")
        counts["generated"] += len(missing)
    return counts


def missing_geneval_images(folder: Path, prompts: int, samples_per_prompt: int) -> int:
    """How many of the ``prompts`` x ``samples_per_prompt`` images of a generated folder are not there (yet)."""
    from vargpt.eval.geneval import SAMPLES_DIRNAME

    return sum(
        not (folder / f"{p:05d}" / SAMPLES_DIRNAME / f"{k:05d}.png").is_file()
        for p in range(prompts)
        for k in range(samples_per_prompt)
    )


def generate_geneval_folders(args: argparse.Namespace, metadata: Sequence[dict]) -> dict:
    """``--ckpt``: fill ``--images`` (and the rewritten-prompt folder) with the missing samples (with ``--shard i/n``
    those of the shard's prompts only); returns counts."""
    from vargpt.eval.geneval import read_rewritten_prompts, write_geneval_samples

    args.images = args.images or args.out / "geneval_images"
    if args.rewrites is not None:
        args.rewritten_images = args.rewritten_images or args.out / "geneval_images_rewritten"
    generator = image_generator(args)
    counts = {}
    folders = {"original": (args.images, None)}
    if args.rewrites is not None:
        folders["rewritten"] = (args.rewritten_images, read_rewritten_prompts(args.rewrites, metadata))
    for label, (folder, prompts) in folders.items():
        if args.shard == (0, 1):
            counts[label] = write_geneval_samples(
                generator, metadata, folder, args.samples_per_prompt, args.sample_seed, prompts, not args.no_progress
            )
        else:
            counts[label] = write_geneval_shard(
                generator, metadata, Path(folder), args.samples_per_prompt, args.sample_seed, prompts, args.shard,
                not args.no_progress,
            )
    return counts


def run_geneval(args: argparse.Namespace) -> Report:
    from vargpt.eval.clip_model import ClipEncoder
    from vargpt.eval.geneval import (
        geneval_report,
        list_geneval_images,
        read_metadata,
        read_rewritten_prompts,
        score_geneval_folder,
    )
    from vargpt.eval.geneval_colour import ClipColourClassifier
    from vargpt.eval.geneval_detector import DetectorSettings, Mask2FormerDetector
    from vargpt.eval.geneval_rules import GenEvalOptions

    metadata = read_metadata(args.metadata)
    generated = generate_geneval_folders(args, metadata) if args.ckpt is not None else None
    if generated is not None and args.shard != (0, 1):
        waiting = geneval_shard_waiting(args, metadata, generated)
        if waiting is not None:
            return waiting
    require(args, images="--images")
    if (args.rewritten_images is None) != (args.rewrites is None):
        raise EvaluationInputError(
            "--rewritten-images and --rewrites go together: the folder and the prompts it was made from"
        )
    folders = {"original": (args.images, None)}
    if args.rewritten_images is not None:
        folders["rewritten"] = (args.rewritten_images, read_rewritten_prompts(args.rewrites, metadata))
    missing_prompts = {
        label: check_folder_against_metadata(list_geneval_images(folder), metadata, rewrites)
        for label, (folder, rewrites) in folders.items()
    }
    options = GenEvalOptions(threshold=args.threshold, counting_threshold=args.counting_threshold)
    settings = DetectorSettings(
        shortest_edge=args.detector_shortest_edge,
        longest_edge=args.detector_longest_edge,
        score_floor=min(options.threshold, options.counting_threshold),
    )
    detector = Mask2FormerDetector.load(args.detector, device=args.device, settings=settings)
    colours = ClipColourClassifier(ClipEncoder.load(args.clip, device=args.device))
    runs = {}
    for label, (folder, _) in folders.items():
        runs[label] = score_geneval_folder(
            folder,
            detector,
            colours.for_image,
            args.out / f"geneval_{label}",
            options,
            args.shard,
            not args.no_progress,
        )
    report = geneval_report(
        runs,
        {
            "metadata": Path(args.metadata).name,
            "metadata_sha256": sha256_of(Path(args.metadata)),
            "rewrites_sha256": sha256_of(Path(args.rewrites)) if args.rewrites else None,
            "detector": detector.identity(),
            "clip": Path(args.clip).name,
            "options": asdict(options),
            "shard": f"{args.shard[0]}/{args.shard[1]}",
        },
    )
    for label, missing in missing_prompts.items():
        report.metrics[f"{label}/prompts_without_images"] = missing
    if generated is not None:
        report.settings.update(
            model_settings(args), samples_per_prompt=args.samples_per_prompt, sample_seed=args.sample_seed
        )
        report.details["generation"] = generated
    return report


def geneval_shard_waiting(args: argparse.Namespace, metadata: Sequence[dict], generated: dict) -> Report | None:
    """With ``--ckpt --shard i/n``: None when every folder is complete (then shard i is scored as usual), else a
    report of this shard's generation and of the images other shards have still to write. Scoring shards split the
    complete folder's images by position, so scoring a folder that other shards are still filling would score some
    images twice and others never; rerun the same command once every shard has generated (nothing is generated
    again)."""
    folders = {"original": args.images}
    if args.rewrites is not None:
        folders["rewritten"] = args.rewritten_images
    missing = {
        label: missing_geneval_images(Path(folder), len(metadata), args.samples_per_prompt)
        for label, folder in folders.items()
    }
    if not any(missing.values()):
        return None
    return Report(
        "geneval",
        {f"{label}/images_missing": count for label, count in missing.items()},
        {**model_settings(args), "shard": f"{args.shard[0]}/{args.shard[1]}", "scored": False,
         "samples_per_prompt": args.samples_per_prompt, "sample_seed": args.sample_seed},
        {"generation": generated, "note": "other shards have images to generate; rerun this command to score"},
    )


def check_folder_against_metadata(
    listing: GenEvalListing, metadata: Sequence[dict], rewrites: Sequence[str] | None
) -> int:
    """Every prompt folder must hold the metadata line of its index; a recorded generation prompt must be the
    original prompt (``rewrites`` None) or its rewrite. Returns how many metadata lines have no folder, so a
    partial folder is reported, never silently scored as complete."""
    seen = set()
    for image in listing.images:
        index = image.prompt_index
        if index >= len(metadata):
            raise EvaluationInputError(
                f"prompt folder {index:05d} has no line in the metadata file ({len(metadata)} lines)"
            )
        folder_metadata = {k: v for k, v in image.metadata.items() if k != "generation_prompt"}
        if folder_metadata != metadata[index]:
            raise EvaluationInputError(
                f"{image.path.parent.parent} holds other metadata than line {index + 1} of the metadata file"
            )
        recorded = image.metadata.get("generation_prompt", metadata[index]["prompt"])
        expected = metadata[index]["prompt"] if rewrites is None else rewrites[index]
        if recorded != metadata[index]["prompt"] and recorded != expected:
            kind = "given as original-prompt images" if rewrites is None else "not the one in the rewrites file"
            raise EvaluationInputError(f"{image.path.parent.parent} was generated from {recorded!r}, {kind}")
        seen.add(index)
    return len(metadata) - len(seen)


def read_generation_prompts(path: Path, by_category: bool) -> dict[str, str]:
    """Relative image path (``<stem>.png``, or ``<category>/<stem>.png`` with ``by_category``) -> prompt, from a
    prompt table (``vargpt.eval.clipscore.read_prompt_table`` formats; categories from a ``category`` field)."""
    from vargpt.eval.clipscore import read_prompt_table
    from vargpt.eval.jsonl import read_jsonl

    table = read_prompt_table(path)
    if not by_category:
        return {f"{stem}.png": prompt for stem, prompt in table.items()}
    if path.suffix == ".jsonl":
        entries = {Path(record["image"]).stem: record for record in read_jsonl(path)}
    else:
        entries = {Path(key).stem: value for key, value in json.loads(path.read_text(encoding="utf-8")).items()}
    relative = {}
    for stem, prompt in table.items():
        entry = entries[stem]
        category = entry.get("category") if isinstance(entry, dict) else None
        if not isinstance(category, str) or not category or "/" in category or category.startswith("."):
            raise EvaluationInputError(f"{path}: entry {stem!r} needs a 'category' (a folder name) for --mjhq")
        relative[f"{category}/{stem}.png"] = prompt
    return relative


def write_prompt_samples(
    generator: VARGPTImageGenerator, prompts: dict[str, str], out_dir: Path, base_seed: int
) -> dict[str, int]:
    """One image per prompt-table entry into ``out_dir`` (entry i in sorted order gets seed ``base_seed + i``);
    existing files are kept, so an interrupted run resumes. Returns counts of generated and reused images."""
    names = sorted(prompts)
    missing = [(index, name) for index, name in enumerate(names) if not (out_dir / name).is_file()]
    for start in range(0, len(missing), generator.batch_size):
        batch = missing[start : start + generator.batch_size]
        images = generator.generate_images([prompts[name] for _, name in batch], [base_seed + i for i, _ in batch])
        for (_, name), image in zip(batch, images, strict=True):
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".part")
            image.save(temporary, format="PNG")
            temporary.replace(path)
    return {"generated": len(missing), "reused": len(names) - len(missing)}


def run_fid(args: argparse.Namespace) -> Report:
    from vargpt.eval.fidelity import FidelityOptions, InceptionFeatures, compare_category_folders, compare_folders

    generated = None
    if args.ckpt is not None:
        require(args, prompts="--prompts")
        args.fake = args.fake or args.out / "fid_fake"
        prompts = read_generation_prompts(Path(args.prompts), args.mjhq)
        generated = write_prompt_samples(image_generator(args), prompts, args.fake, args.sample_seed)
    require(args, fake="--fake")
    inception = InceptionFeatures.from_weights(
        args.inception,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.out / "inception_cache",
        progress=not args.no_progress,
    )
    options = FidelityOptions(fid=not args.no_fid, kid=not args.no_kid, isc=not args.no_is)
    settings = {"inception_sha256": inception.extractor_id, "real": Path(args.real).name, "fake": Path(args.fake).name}
    if args.mjhq:
        result = compare_category_folders(inception, args.real, args.fake, args.resolution, args.resize_mode, options)
        metrics = {f"overall/{k}": v for k, v in result["overall"].items()}
        for category, values in result["categories"].items():
            metrics[f"{category}/fid"] = values.get("fid")
        details = result
    else:
        result = compare_folders(inception, args.real, args.fake, args.resolution, args.resize_mode, options)
        metrics = {k: v for k, v in result.items() if not k.endswith("_set")}
        details = {k: v for k, v in result.items() if k.endswith("_set")}
    metrics.update(resolution=result["resolution"], resize_mode=result["resize_mode"])
    if generated is not None:
        settings.update(model_settings(args), prompts=Path(args.prompts).name, sample_seed=args.sample_seed)
        details["generation"] = generated
    return Report(benchmark="fid_mjhq" if args.mjhq else "fid", metrics=metrics, settings=settings, details=details)


def run_clipscore(args: argparse.Namespace) -> Report:
    from vargpt.eval.clip_model import ClipEncoder
    from vargpt.eval.clipscore import clip_score_folder, read_prompt_table

    prompts = read_prompt_table(args.prompts)
    generated = None
    if args.ckpt is not None:
        args.images = args.images or args.out / "clipscore_images"
        table = read_generation_prompts(Path(args.prompts), by_category=False)
        generated = write_prompt_samples(image_generator(args), table, args.images, args.sample_seed)
    require(args, images="--images")
    encoder = ClipEncoder.load(args.clip, device=args.device)
    result = clip_score_folder(encoder, args.images, prompts, batch_size=args.batch_size, progress=not args.no_progress)
    metrics = {
        "clip_score": result["clip_score"],
        "n": result["n"],
        "prompts_without_image": result["prompts_without_image"],
    }
    for name, values in result["categories"].items():
        metrics[f"{name}/clip_score"] = values["clip_score"]
    settings = {"clip": result["clip_folder"], "prompts": Path(args.prompts).name, "images": Path(args.images).name}
    if generated is not None:
        settings.update(model_settings(args), sample_seed=args.sample_seed)
        result["generation"] = generated
    return Report(benchmark="clipscore", metrics=metrics, settings=settings, details=result)


def run_understanding(args: argparse.Namespace) -> Report:
    from vargpt.eval.understanding.runner import evaluate_understanding, get_benchmark, read_predictions

    if args.ckpt is None:
        require(args, predictions="--predictions")
    benchmark = get_benchmark(args.benchmark, args.seed)
    questions = benchmark.load(Path(args.data))
    if args.ckpt is not None:
        from vargpt.eval.model_adapters import VARGPTChatModel
        from vargpt.eval.understanding.runner import generate_predictions

        args.predictions = args.predictions or args.out / f"{benchmark.name}_predictions.jsonl"
        generate_predictions(
            VARGPTChatModel(load_checkpoint(args)), questions.questions, args.predictions, not args.no_progress
        )
    predictions = read_predictions(args.predictions)
    report = evaluate_understanding(benchmark, questions, predictions, args.out, Path(args.data).name)
    report.settings.update(predictions=Path(args.predictions).name, seed=args.seed)
    if args.ckpt is not None:
        report.settings.update(ckpt=Path(args.ckpt).name, decoding="greedy")
    return report


def run_shapes(args: argparse.Namespace) -> Report:
    from vargpt.eval.shapes import run_shapes_benchmark, shapes_report

    result = run_shapes_benchmark(
        load_checkpoint(args),
        args.out,
        per_task=args.per_task,
        seed=args.seed,
        size=args.size,
        samples_per_prompt=args.samples_per_prompt,
        parts=args.parts,
        batch_size=args.batch_size,
        settings=generation_settings(args),
    )
    report = shapes_report(result)
    report.settings["ckpt"] = Path(args.ckpt).name
    return report


def add_model_options(parser: argparse.ArgumentParser, generation: bool, required: bool = False) -> None:
    """``--ckpt`` and what is passed to the model; ``generation`` adds the sampling options and seeds."""
    parser.add_argument(
        "--ckpt", type=Path, required=required, help="model folder: generate the outputs with it, then score"
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: the checkpoint's)")
    if not generation:
        return
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: config, VARGPT 3.0)")
    parser.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                        help="guidance per scale: constant, or linear from 1 at the first scale to --cfg at the last "
                             "(default: config, VARGPT constant)")
    parser.add_argument("--temperature", type=float, default=None, help="bit sampling temperature (config: 0.5)")
    parser.add_argument("--top-p", type=float, default=None, help="bit sampling top-p (config: 0.97)")
    parser.add_argument("--pn", default=None, help="resolution preset (0.06M = 256 px, 0.25M = 512 px)")
    parser.add_argument("--size", type=int, default=None, help="square image side in pixels (overrides --pn)")
    parser.add_argument("--aspect", type=float, default=1.0, help="h / w for --pn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results and caches")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    subparsers = parser.add_subparsers(dest="benchmark", required=True)

    geneval = subparsers.add_parser("geneval", parents=[common], help="score a GenEval image folder")
    geneval.add_argument("--images", type=Path, help="folder in the official layout (original prompts)")
    geneval.add_argument("--metadata", type=Path, required=True, help="evaluation_metadata.jsonl")
    geneval.add_argument("--detector", type=Path, required=True, help="Mask2Former COCO-instance weights folder")
    geneval.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L/14 weights folder")
    geneval.add_argument("--rewritten-images", type=Path, help="a second folder, generated from rewritten prompts")
    geneval.add_argument("--rewrites", type=Path, help="JSON object: original prompt -> rewritten prompt")
    geneval.add_argument("--threshold", type=float, default=0.3, help="detection threshold (GenEval: 0.3)")
    geneval.add_argument("--counting-threshold", type=float, default=0.9, help="counting threshold (GenEval: 0.9)")
    geneval.add_argument("--detector-shortest-edge", type=int, default=800, help="resize (mmdet test pipeline: 800)")
    geneval.add_argument("--detector-longest-edge", type=int, default=1333, help="resize cap (mmdet: 1333)")
    geneval.add_argument(
        "--shard", type=parse_shard, default=(0, 1),
        help="only shard i of n (i/n): with --ckpt, generate prompts i, i+n, ...; score shard i once all are there",
    )
    geneval.add_argument("--device", default="cpu")
    add_model_options(geneval, generation=True)
    geneval.add_argument("--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT, help="GenEval: 4")
    geneval.add_argument("--sample-seed", type=int, default=BASE_SEED, help="base of the per-image seeds (GenEval: 42)")
    geneval.add_argument("--batch-size", type=int, default=1, help="images generated at once")
    geneval.set_defaults(handler=run_geneval)

    fid = subparsers.add_parser("fid", parents=[common], help="FID / KID / IS between two image folders")
    fid.add_argument("--real", type=Path, required=True, help="reference images (MJHQ: category subfolders)")
    fid.add_argument("--fake", type=Path, help="generated images (MJHQ: the same subfolders)")
    fid.add_argument("--prompts", type=Path, help="with --ckpt: prompt table to generate --fake from")
    fid.add_argument("--inception", type=Path, required=True, help="weights-inception-2015-12-05-6726825d.pth")
    fid.add_argument("--resolution", type=int, help="image side; required unless every image already has one size")
    fid.add_argument("--resize-mode", choices=("none", "bicubic", "center_crop"), default="none")
    fid.add_argument("--mjhq", action="store_true", help="per-category and overall (MJHQ-30K layout)")
    fid.add_argument("--no-fid", action="store_true", help="skip FID (e.g. KID only)")
    fid.add_argument("--no-kid", action="store_true")
    fid.add_argument("--no-is", action="store_true")
    fid.add_argument("--batch-size", type=int, default=32)
    fid.add_argument("--device", default="cpu")
    add_model_options(fid, generation=True)
    fid.add_argument("--sample-seed", type=int, default=0, help="prompt i (sorted by name) gets seed + i")
    fid.set_defaults(handler=run_fid)

    clipscore = subparsers.add_parser("clipscore", parents=[common], help="CLIP score of images and prompts")
    clipscore.add_argument("--images", type=Path)
    clipscore.add_argument("--prompts", type=Path, required=True, help=".json {stem: prompt} or .jsonl {image, prompt}")
    clipscore.add_argument("--clip", type=Path, required=True, help="CLIP weights folder")
    clipscore.add_argument("--batch-size", type=int, default=32)
    clipscore.add_argument("--device", default="cpu")
    add_model_options(clipscore, generation=True)
    clipscore.add_argument("--sample-seed", type=int, default=0, help="prompt i (sorted by name) gets seed + i")
    clipscore.set_defaults(handler=run_clipscore)

    for name in UNDERSTANDING_BENCHMARKS:
        understanding = subparsers.add_parser(name, parents=[common], help=f"score {name} predictions")
        understanding.add_argument(
            "--data", type=Path, required=True, help="the benchmark's VLMEvalKit .tsv (or .jsonl)"
        )
        understanding.add_argument("--predictions", type=Path, help='JSON lines {"id", "answer"}')
        understanding.add_argument("--seed", type=int, default=0, help="seed of MMMU's random fallback")
        understanding.add_argument("--device", default="cpu")
        add_model_options(understanding, generation=False)
        understanding.set_defaults(handler=run_understanding)

    shapes = subparsers.add_parser("shapes", parents=[common], help="shapes-world generation, Q&A and editing")
    add_model_options(shapes, generation=True, required=True)
    shapes.add_argument("--per-task", type=int, default=4, help="held-out prompts (questions, edits) per type")
    shapes.add_argument("--samples-per-prompt", type=int, default=1)
    shapes.add_argument("--seed", type=int, default=0, help="seed of the held-out examples and image seeds")
    shapes.add_argument("--parts", nargs="+", choices=SHAPES_PARTS, default=list(SHAPES_PARTS), help="what to run")
    shapes.add_argument("--batch-size", type=int, default=8)
    shapes.add_argument("--device", default="cpu")
    shapes.set_defaults(handler=run_shapes)
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    """Run one benchmark, write its JSON and Markdown report, print the table and return the report."""
    args = build_parser().parse_args(argv)
    report = args.handler(args)
    stem = (
        report.benchmark
        if getattr(args, "shard", (0, 1)) == (0, 1)
        else f"{report.benchmark}_shard{args.shard[0]}of{args.shard[1]}"
    )
    write_report(report, args.out, stem)
    sys.stdout.write(report_markdown(report))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad inputs: a one-line message, not a traceback
        sys.exit(f"evaluate.py: error: {error}")
