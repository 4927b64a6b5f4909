"""Score benchmark outputs: ``python evaluate.py BENCHMARK [options]``.

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

Generating with a model plugs in through ``vargpt.eval.protocols`` (``ImageGenerator`` for
``vargpt.eval.geneval.write_geneval_samples``, ``ChatModel`` for
``vargpt.eval.understanding.runner.generate_predictions``); a ``--ckpt`` option will construct those from a
checkpoint folder once the model can be loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from vargpt.eval.geneval import GenEvalListing
from vargpt.eval.report import Report, report_markdown, write_report
from vargpt.eval.understanding.runner import UNDERSTANDING_BENCHMARKS

DEFAULT_OUT = Path("runs") / "eval"


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

    if (args.rewritten_images is None) != (args.rewrites is None):
        raise EvaluationInputError(
            "--rewritten-images and --rewrites go together: the folder and the prompts it was made from"
        )
    metadata = read_metadata(args.metadata)
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
    return report


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


def run_fid(args: argparse.Namespace) -> Report:
    from vargpt.eval.fidelity import FidelityOptions, InceptionFeatures, compare_category_folders, compare_folders

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
    return Report(benchmark="fid_mjhq" if args.mjhq else "fid", metrics=metrics, settings=settings, details=details)


def run_clipscore(args: argparse.Namespace) -> Report:
    from vargpt.eval.clip_model import ClipEncoder
    from vargpt.eval.clipscore import clip_score_folder, read_prompt_table

    prompts = read_prompt_table(args.prompts)
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
    return Report(benchmark="clipscore", metrics=metrics, settings=settings, details=result)


def run_understanding(args: argparse.Namespace) -> Report:
    from vargpt.eval.understanding.runner import evaluate_understanding, get_benchmark, read_predictions

    benchmark = get_benchmark(args.benchmark, args.seed)
    questions = benchmark.load(Path(args.data))
    predictions = read_predictions(args.predictions)
    report = evaluate_understanding(benchmark, questions, predictions, args.out, Path(args.data).name)
    report.settings.update(predictions=Path(args.predictions).name, seed=args.seed)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results and caches")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    subparsers = parser.add_subparsers(dest="benchmark", required=True)

    geneval = subparsers.add_parser("geneval", parents=[common], help="score a GenEval image folder")
    geneval.add_argument("--images", type=Path, required=True, help="folder in the official layout (original prompts)")
    geneval.add_argument("--metadata", type=Path, required=True, help="evaluation_metadata.jsonl")
    geneval.add_argument("--detector", type=Path, required=True, help="Mask2Former COCO-instance weights folder")
    geneval.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L/14 weights folder")
    geneval.add_argument("--rewritten-images", type=Path, help="a second folder, generated from rewritten prompts")
    geneval.add_argument("--rewrites", type=Path, help="JSON object: original prompt -> rewritten prompt")
    geneval.add_argument("--threshold", type=float, default=0.3, help="detection threshold (GenEval: 0.3)")
    geneval.add_argument("--counting-threshold", type=float, default=0.9, help="counting threshold (GenEval: 0.9)")
    geneval.add_argument("--detector-shortest-edge", type=int, default=800, help="resize (mmdet test pipeline: 800)")
    geneval.add_argument("--detector-longest-edge", type=int, default=1333, help="resize cap (mmdet: 1333)")
    geneval.add_argument("--shard", type=parse_shard, default=(0, 1), help="score only shard i of n (i/n)")
    geneval.add_argument("--device", default="cpu")
    geneval.set_defaults(handler=run_geneval)

    fid = subparsers.add_parser("fid", parents=[common], help="FID / KID / IS between two image folders")
    fid.add_argument("--real", type=Path, required=True, help="reference images (MJHQ: category subfolders)")
    fid.add_argument("--fake", type=Path, required=True, help="generated images (MJHQ: the same subfolders)")
    fid.add_argument("--inception", type=Path, required=True, help="weights-inception-2015-12-05-6726825d.pth")
    fid.add_argument("--resolution", type=int, help="image side; required unless every image already has one size")
    fid.add_argument("--resize-mode", choices=("none", "bicubic", "center_crop"), default="none")
    fid.add_argument("--mjhq", action="store_true", help="per-category and overall (MJHQ-30K layout)")
    fid.add_argument("--no-fid", action="store_true", help="skip FID (e.g. KID only)")
    fid.add_argument("--no-kid", action="store_true")
    fid.add_argument("--no-is", action="store_true")
    fid.add_argument("--batch-size", type=int, default=32)
    fid.add_argument("--device", default="cpu")
    fid.set_defaults(handler=run_fid)

    clipscore = subparsers.add_parser("clipscore", parents=[common], help="CLIP score of images and prompts")
    clipscore.add_argument("--images", type=Path, required=True)
    clipscore.add_argument("--prompts", type=Path, required=True, help=".json {stem: prompt} or .jsonl {image, prompt}")
    clipscore.add_argument("--clip", type=Path, required=True, help="CLIP weights folder")
    clipscore.add_argument("--batch-size", type=int, default=32)
    clipscore.add_argument("--device", default="cpu")
    clipscore.set_defaults(handler=run_clipscore)

    for name in UNDERSTANDING_BENCHMARKS:
        understanding = subparsers.add_parser(name, parents=[common], help=f"score {name} predictions")
        understanding.add_argument(
            "--data", type=Path, required=True, help="the benchmark's VLMEvalKit .tsv (or .jsonl)"
        )
        understanding.add_argument("--predictions", type=Path, required=True, help='JSON lines {"id", "answer"}')
        understanding.add_argument("--seed", type=int, default=0, help="seed of MMMU's random fallback")
        understanding.set_defaults(handler=run_understanding)
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
