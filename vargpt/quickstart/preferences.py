"""DPO pairs from the generation SFT model's own mistakes: ``python -m vargpt.quickstart.preferences EXPORT OUT``.

For held-out training prompts of the shapes world (``captions.benchmark_examples`` on the *train* split: streams
disjoint from the training samples and from the benchmark's eval split), the model draws ``samples_per_prompt``
images each with its own sampling settings; the exact scorer (``scorer.score_image``) judges them. A prompt the model
got wrong at least once gives up to ``rejected_per_prompt`` pairs: chosen = the world's render of the prompt's scene,
rejected = one of the model's wrong images. Prompts it always gets right give none.

This is the reference's construction with the shapes world standing in (VARGPT-v1.1 prefers curated Midjourney /
Flux images, ARCHITECTURE §3): the rejected images are the failures this model actually makes (merged blobs, a
missing or extra object), not renders that break one attribute of the prompt, which it rarely draws. On validation
prompts, from one generation SFT export, DPO on these pairs moved shapes-GenEval by +0.04 where the one-attribute
pairs moved it by -0.05 with the same settings (configs/quickstart/dpo.yaml).

The pairs are written as ``preference`` samples (``datamodules.schema.Sample``) into ``shards`` shards of
``OUT/`` with ``summary.json`` (pairs, the model's per-task accuracy on these prompts); the folder is built aside and
renamed into place, so it exists only complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.schema import IMAGE_GEN_PLACEHOLDER, Sample
from datamodules.shapes import TASKS, benchmark_examples, render_scene, score_image
from datamodules.shards import ShardWriter
from vargpt.checkpoints.core import weights_digest
from vargpt.config import ConfigError
from vargpt.eval.geneval import sample_seed

SUMMARY_FILE = "summary.json"
SEED_OFFSET = 2_000_000  # image seeds of these samples never coincide with the benchmark's of the same base seed


@dataclass
class ModelPreferenceSettings:
    """How many prompts, images and pairs: ``per_task`` prompts of each of the six task types, ``samples_per_prompt``
    images of each, up to ``rejected_per_prompt`` pairs per prompt, spread over ``shards`` shards."""

    per_task: int = 100
    samples_per_prompt: int = 4
    rejected_per_prompt: int = 2
    shards: int = 8  # every DPO process x data worker reads shards of its own
    batch_size: int = 64

    def __post_init__(self) -> None:
        for field in fields(self):  # every setting is a count
            name, value = field.name, getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model_preferences.{name} must be an integer >= 1, got {value!r}")
        if self.rejected_per_prompt > self.samples_per_prompt:
            raise ConfigError(
                f"model_preferences.rejected_per_prompt ({self.rejected_per_prompt}) cannot exceed "
                f"samples_per_prompt ({self.samples_per_prompt})"
            )


def preference_pairs(
    generator: Any, settings: ModelPreferenceSettings, seed: int, size: int
) -> tuple[list[Sample], dict[str, Any]]:
    """The pairs (``preference`` samples) and a summary, from ``generator.generate_images(prompts, seeds)`` (an
    ``ImageGenerator``, e.g. ``model_adapters.as_image_generator(model, batch_size)``) that draws ``size`` px images;
    the prompts and image seeds follow from ``seed``."""
    examples = benchmark_examples(settings.per_task, seed, split="train")
    requests = [(index, k) for index in range(len(examples)) for k in range(settings.samples_per_prompt)]
    base_seed = seed + SEED_OFFSET
    wrong: dict[int, list[tuple[Image.Image, str]]] = defaultdict(list)
    correct: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(requests), settings.batch_size):
        batch = requests[start : start + settings.batch_size]
        prompts = [examples[index].prompt for index, _ in batch]
        images = generator.generate_images(prompts, [sample_seed(index, k, base_seed) for index, k in batch])
        if len(images) != len(batch):
            raise ValueError(f"the generator returned {len(images)} images for {len(batch)} prompts")
        for (index, _), image in zip(batch, images):
            result = score_image(image, examples[index].spec)
            correct[examples[index].task].append(result.correct)
            if not result.correct:
                wrong[index].append((image, result.reason))
    pairs = []
    reply = {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER}
    for index, rejected in sorted(wrong.items()):
        example = examples[index]
        chosen = render_scene(example.scene, size)
        for k, (image, reason) in enumerate(rejected[: settings.rejected_per_prompt]):
            if image.size != chosen.size:
                raise ValueError(f"the model drew {image.size[0]} x {image.size[1]} px images, not the {size} px of "
                                 "the chosen renders (the size DPO trains at)")
            pairs.append(Sample(
                key=f"shapes_model_preference_{seed}_{index:06d}_{k}",
                kind="preference",
                messages=[{"role": "user", "content": example.prompt}],  # the request the images were drawn for
                images={"chosen.png": chosen, "rejected.png": image},
                metadata={"source": "model", "task": example.task, "spec": example.spec, "rejected_reason": reason,
                          "chosen_scene": example.scene.to_dict()},
                chosen=dict(reply),
                rejected=dict(reply),
            ))
    summary = {
        "settings": {**asdict(settings), "seed": seed, "size": size},
        "prompts": len(examples),
        "images": len(requests),
        "pairs": len(pairs),
        "prompts_with_pairs": len(wrong),
        "sample_accuracy": {task: sum(correct[task]) / len(correct[task]) for task in TASKS if correct[task]},
    }
    return pairs, summary


def write_preference_shards(pairs: Sequence[Sample], summary: dict[str, Any], out_dir: str | os.PathLike[str],
                            shards: int) -> Path:
    """``pairs`` spread evenly over ``shards`` shards in ``out_dir`` with ``summary.json``; a previous pairs folder
    there is replaced whole, any other non-empty folder is refused."""
    if len(pairs) < shards:
        raise ValueError(f"{len(pairs)} preference pair(s) cannot fill {shards} shards (one per DPO data reader): "
                         "the model made too few mistakes on these prompts; raise model_preferences.per_task")
    out = Path(out_dir).resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY_FILE).is_file():
        raise ValueError(f"{out} is not empty and holds no {SUMMARY_FILE}: not a folder of preference pairs to "
                         "replace; choose a new or empty folder")
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    bounds = [len(pairs) * shard // shards for shard in range(shards + 1)]  # sizes differ by at most one
    for shard in range(shards):
        chunk = pairs[bounds[shard] : bounds[shard + 1]]
        with ShardWriter(building, prefix="shapes-train", max_samples=len(chunk), first_shard=shard) as writer:
            for pair in chunk:
                writer.write(pair)
        if len(writer.paths) != 1:  # a shard split by the writer's byte limit
            raise RuntimeError(f"shard {shard} of the preference pairs took {len(writer.paths)} files")
    (building / SUMMARY_FILE).write_text(json.dumps({**summary, "shards": shards}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(building, out)
    return out


def build_model_preferences(
    export: str | os.PathLike[str], out_dir: str | os.PathLike[str], settings: ModelPreferenceSettings, seed: int,
    size: int
) -> dict[str, Any]:
    """Load ``export``, draw and score its ``size`` px images, write the pairs; returns the summary."""
    from vargpt.eval.model_adapters import GenerationSettings, as_image_generator, load_model

    model = load_model(export)
    generator = as_image_generator(model, settings.batch_size, GenerationSettings(size=size))
    pairs, summary = preference_pairs(generator, settings, seed, size)
    summary["export"] = {"path": str(export), "weights_sha256": export_digest(export)}
    write_preference_shards(pairs, summary, out_dir, settings.shards)
    return summary


def export_digest(export: str | os.PathLike[str]) -> str | None:
    """The digest of an export's weights and its ``config.json`` (sampling defaults): which model the pairs were
    drawn from; None when the folder has no weights."""
    if not any(Path(export).glob("*.safetensors")):
        return None
    return weights_digest(export, extra=("config.json",))


def preferences_done(
    out_dir: str | os.PathLike[str], settings: ModelPreferenceSettings, seed: int, size: int,
    export: str | os.PathLike[str],
) -> bool:
    """The pairs exist, complete, for the same settings and drawn from the same weights."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    digest = export_digest(export)
    return (digest is not None and summary.get("settings") == {**asdict(settings), "seed": seed, "size": size}
            and summary.get("export", {}).get("weights_sha256") == digest)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vargpt.quickstart.preferences",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="generation SFT export folder")
    parser.add_argument("out_dir", type=Path, help="folder to write the preference shards into (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="prompt and image seed (default 0)")
    parser.add_argument("--size", type=int, default=32, help="px of the images, the size DPO trains at (default 32)")
    for field in fields(ModelPreferenceSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    arguments = vars(parser.parse_args(argv))
    export, out_dir, seed, size = (arguments.pop(name) for name in ("export", "out_dir", "seed", "size"))
    try:
        settings = ModelPreferenceSettings(**arguments)
    except ConfigError as error:
        parser.error(str(error))
    if not export.is_dir():
        parser.error(f"no export folder at {export}")
    summary = build_model_preferences(export, out_dir, settings, seed, size)
    print(json.dumps({key: summary[key] for key in ("pairs", "prompts", "images", "sample_accuracy")}))


if __name__ == "__main__":
    main()
