"""The embedded default, step by step: shards, text tokenizer, the six stages through ``train.py`` (DPO after its
pairs are drawn from the generation SFT model, ``vargpt.quickstart.preferences``), evaluation, report.

Every step writes under ``config.root`` and is skipped when its output is already complete (the data marker, the
tokenizer folder, a stage's atomic ``export/``, the DPO pairs' summary for the same settings and weights, or DPO's
export), so an interrupted run picks up where it stopped; ``fresh=True`` redoes everything. Step wall times are kept
in ``<root>/timings.json`` across launches, so the report's ``wall_seconds`` is the time the whole pipeline took, not
the time of the last launch.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vargpt.quickstart.config import (
    DATA_DIR,
    DataStepConfig,
    QuickstartConfig,
    model_preference_dir,
    reads_model_preferences,
    starts_from_pipeline_vision,
    vision_dir,
)

logger = logging.getLogger(__name__)

TEXT_TOKENIZER_DIR, REPORT_DIR, EVAL_DIR = "text_tokenizer", "report", "evaluation"
DATA_MARKER, TIMINGS_FILE = "COMPLETE.json", "timings.json"
REPOSITORY = Path(__file__).resolve().parents[2]
# OpenMP threads that sleep instead of spinning while they wait: on a small CPU shared with the data worker (or
# anything else) spinning threads slow the small matrices of these models down several times. A user's own
# OMP_WAIT_POLICY wins.
STAGE_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class QuickstartError(RuntimeError):
    """A pipeline step failed; the message names the step and where its output or log is."""


class Timings:
    """Wall seconds per step, persisted in ``<root>/timings.json`` after every step."""

    def __init__(self, root: Path) -> None:
        self.path = root / TIMINGS_FILE
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.seconds, indent=2))
        os.replace(temporary, self.path)


def stage_dir(config: QuickstartConfig, stage: str) -> Path:
    return Path(config.root) / stage


def export_dir(config: QuickstartConfig, stage: str) -> Path:
    return stage_dir(config, stage) / "export"


def stage_done(config: QuickstartConfig, stage: str) -> bool:
    """A stage is done when its export folder exists (exports are renamed into place whole)."""
    return (export_dir(config, stage) / "config.json").is_file()


def data_done(config: QuickstartConfig) -> bool:
    """The shards exist, complete, for the same data settings."""
    marker = Path(config.root) / DATA_DIR / DATA_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == asdict(config.data)


def text_tokenizer_done(config: QuickstartConfig) -> bool:
    return (Path(config.root) / TEXT_TOKENIZER_DIR / "tokenizer.json").is_file()


def _write_range(folder: Path, data: DataStepConfig, kind: str, start: int) -> None:
    """Write the shard of ``kind`` that starts at sample ``start``."""
    from datamodules.shapes.write import write_shard_range

    stop = min(start + data.samples_per_shard, data.count(kind))
    write_shard_range(
        folder, kind, start, stop, data.seed, "train", data.size, data.samples_per_shard, data.questions_per_image
    )


def write_data(config: QuickstartConfig, processes: int | None = None) -> Path:
    """Shapes-world training shards of every kind under ``<root>/data/<kind>/`` (replacing an incomplete folder).

    The shards are written in parallel by up to ``processes`` worker processes (default: one per CPU core); every
    sample is a pure function of (kind, index, seed), so the files are the same however many write them. The workers
    are spawned, so a script that calls this (or ``run_pipeline``) needs the usual ``if __name__ == "__main__":``
    guard around its entry point."""
    from datamodules.shapes.samples import SAMPLE_KINDS

    folder = Path(config.root) / DATA_DIR
    if folder.exists():
        shutil.rmtree(folder)
    data = config.data
    jobs = [(kind, start) for kind in SAMPLE_KINDS for start in range(0, data.count(kind), data.samples_per_shard)]
    kinds, starts = [kind for kind, _ in jobs], [start for _, start in jobs]
    arguments = ([folder] * len(jobs), [data] * len(jobs), kinds, starts)
    workers = max(1, min(len(jobs), processes or available_cores()))
    if workers == 1:
        list(map(_write_range, *arguments))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_write_range, *arguments))  # list(): wait for every shard and raise a worker's error
    for kind in SAMPLE_KINDS:
        logger.info("data: %d %s samples in %d shard(s)", data.count(kind), kind, kinds.count(kind))
    (folder / DATA_MARKER).write_text(json.dumps(asdict(data)))
    return folder


def tokenizer_corpus(config: QuickstartConfig) -> Iterator[str]:
    """Every text of the first ``corpus_per_kind`` training samples of each kind (requests, replies, questions,
    answers, instructions); images are rendered at 8 px since only the texts are read."""
    from datamodules.shapes.samples import SAMPLE_KINDS, make_sample

    for kind in SAMPLE_KINDS:
        for index in range(config.text_tokenizer.corpus_per_kind):
            sample = make_sample(kind, index, config.data.seed, "train", 8, config.data.questions_per_image)
            for message in [*sample.messages, sample.chosen, sample.rejected]:
                if message:
                    yield message["content"]


def build_text_tokenizer(config: QuickstartConfig) -> Path:
    """The byte-level BPE with Qwen2-VL's and VARGPT's special tokens at ``<root>/text_tokenizer`` (no download)."""
    from vargpt.text_tokenizer import train_text_tokenizer

    folder = Path(config.root) / TEXT_TOKENIZER_DIR
    tokenizer = train_text_tokenizer(tokenizer_corpus(config), vocab_size=config.text_tokenizer.vocab_size)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(str(temporary))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)
    logger.info("text tokenizer: %d tokens saved to %s", len(tokenizer), folder)
    return folder


def vision_stage(config: QuickstartConfig) -> Any | None:
    """The run config of the first stage that starts from the pipeline's vision tower (``init_from.vision``), or
    None: the vision step pretrains the tower for that stage's model config and understanding image size."""
    from vargpt.run_config import load_run_config

    for stage in config.stages:
        run = load_run_config(config.stage_file(stage), config.stage_arguments(stage))
        if starts_from_pipeline_vision(config, run):
            return run
    return None


def vision_step_config(config: QuickstartConfig, run: Any, qwen2_vl: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the vision step trains with for ``run`` (whose model config gives ``qwen2_vl`` unless passed)."""
    from vargpt.quickstart.vision import step_config

    qwen2_vl = run.model_config().qwen2_vl if qwen2_vl is None else qwen2_vl
    return step_config(qwen2_vl, config.vision, config.data.seed, config.data.size,
                       run.data.understanding_min_pixels, run.data.understanding_max_pixels)


def vision_done(config: QuickstartConfig, run: Any) -> bool:
    from vargpt.quickstart.vision import vision_done as done

    return done(vision_dir(config), vision_step_config(config, run))


def pretrain_vision(config: QuickstartConfig, run: Any) -> Path:
    """Pretrain the vision tower on per-token labels of shapes-world scenes (``vargpt.quickstart.vision``) and
    write it to ``<root>/vision``."""
    from vargpt.checkpoints.vision import save_vision_tower
    from vargpt.quickstart.vision import pretrain_vision as pretrain

    qwen2_vl = run.model_config().qwen2_vl
    step = vision_step_config(config, run, qwen2_vl)
    visual, metrics = pretrain(qwen2_vl, config.vision, step["seed"], step["size"], *step["understanding_pixels"],
                               log=logger.info)
    folder = save_vision_tower(visual, vision_dir(config), step, metrics)
    logger.info("vision: held-out per-token accuracy %s, %s s", json.dumps(
        {k: round(v, 3) for k, v in metrics["held_out"].items()}), f"{metrics['seconds']:.0f}")
    return folder


def model_preference_source(config: QuickstartConfig) -> Path | None:
    """The export the DPO pairs are drawn from (the DPO stage's starting point, the generation SFT export), or None
    when the DPO stage does not read the pipeline's model pairs (or does not run)."""
    from vargpt.run_config import load_run_config

    if "dpo" not in config.stages:
        return None
    run = load_run_config(config.stage_file("dpo"), config.stage_arguments("dpo"))
    if not reads_model_preferences(config, run):
        return None
    if run.init_from.export is None:
        raise QuickstartError("the DPO stage reads the model's preference pairs but starts from no export "
                              "(init_from.export): the pairs are drawn from the model DPO starts from")
    return Path(run.init_from.export)


def model_preferences_done(config: QuickstartConfig, export: Path) -> bool:
    from vargpt.quickstart.preferences import preferences_done

    return preferences_done(model_preference_dir(config), config.model_preferences, config.data.seed,
                            config.data.size, export)


def build_model_preferences(config: QuickstartConfig, export: Path) -> dict[str, Any]:
    """Draw the generation SFT model's images for held-out training prompts and write the DPO pairs of its wrong
    ones (``vargpt.quickstart.preferences``); logs how many. An interrupted DPO attempt is removed: it trained on
    other pairs, so it starts over instead of resuming."""
    from vargpt.quickstart.preferences import build_model_preferences as build

    summary = build(export, model_preference_dir(config), config.model_preferences, config.data.seed,
                    config.data.size)
    shutil.rmtree(stage_dir(config, "dpo"), ignore_errors=True)
    logger.info("model_preferences: %d pairs from %d prompts (%d with a wrong image); the model's accuracy on them: %s",
                summary["pairs"], summary["prompts"], summary["prompts_with_pairs"],
                ", ".join(f"{task} {value:.2f}" for task, value in summary["sample_accuracy"].items()))
    return summary


def stage_processes(config: QuickstartConfig, stage: str) -> int:
    """How many training processes ``stage`` runs on this machine: its ``trainer.devices`` on one node, else 1
    (several nodes, or ``devices`` left for Lightning to decide, are launched as ``train.py`` alone)."""
    from vargpt.run_config import load_run_config

    trainer = load_run_config(config.stage_file(stage), config.stage_arguments(stage)).trainer
    return trainer.devices if isinstance(trainer.devices, int) and trainer.num_nodes == 1 else 1


def train_command(config: QuickstartConfig, stage: str, processes: int | None = None) -> list[str]:
    """The command line of one stage: ``train.py``, under ``torch.distributed.run`` when it trains on several
    processes of this machine. Lightning then starts no process itself (it reads the launcher's environment), so
    both start at once instead of the second only after the first has imported and built everything: on two
    cores about 3 s less per stage (a 2-step editing SFT run 15.2 s vs 18.8 s, alignment 31.0 s vs 33.8 s), the
    same weights. ``processes``: the stage's ``stage_processes``, when the caller has it already."""
    script = REPOSITORY / "train.py"
    if not script.is_file():
        raise QuickstartError(f"train.py not found at {script}: run from a source checkout (pip install -e .)")
    arguments = [str(script), str(config.stage_file(stage)), *config.stage_arguments(stage)]
    processes = stage_processes(config, stage) if processes is None else processes
    if processes == 1:
        return [sys.executable, *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *arguments]


def stage_environment(processes: int) -> dict[str, str]:
    """The environment of a stage's command: ``STAGE_ENVIRONMENT`` and, for several processes, each one's
    ``OMP_NUM_THREADS`` as Lightning gives them when it starts them (available cores / processes, at least 1; the
    launcher's own default is 1 whatever the machine). The user's environment wins."""
    environment = dict(STAGE_ENVIRONMENT)
    if processes > 1:
        environment["OMP_NUM_THREADS"] = str(max(1, available_cores() // processes))
    return {**environment, **os.environ}


def run_stage(config: QuickstartConfig, stage: str, runner: Callable[..., Any] = subprocess.run) -> Path:
    """Train one stage in its own processes (``train_command``: what a user would type); an interrupted earlier
    attempt of the stage is resumed from its ``last.ckpt`` (``train.py --resume last``, exact mid-epoch)."""
    folder = stage_dir(config, stage)
    processes = stage_processes(config, stage)  # loads and validates the stage's run config once
    command = train_command(config, stage, processes)
    if (folder / "checkpoints" / "last.ckpt").is_file():
        command.append("--resume=last")
    elif folder.exists():
        shutil.rmtree(folder)  # an attempt that stopped before its first checkpoint
    logger.info("stage %s: %s", stage, " ".join(command))
    completed = runner(command, check=False, env=stage_environment(processes))
    if completed.returncode != 0 or not stage_done(config, stage):
        raise QuickstartError(
            f"stage {stage} failed (exit code {completed.returncode}); its logs are under {folder}; rerun the "
            f"pipeline to continue from this stage"
        )
    return export_dir(config, stage)


def run_pipeline(config: QuickstartConfig, fresh: bool = False) -> dict[str, Any]:
    """Every step in order; returns the metrics written to ``<root>/report/metrics.json``."""
    from vargpt.quickstart.evaluation import evaluate_pipeline
    from vargpt.quickstart.report import write_report

    root = Path(config.root)
    if fresh and root.exists():
        if any(root.iterdir()) and not (root / TIMINGS_FILE).is_file():
            raise QuickstartError(f"--fresh would delete {root}, which does not look like a quickstart run folder "
                                  f"(no {TIMINGS_FILE}); choose another root or delete it yourself")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    timings = Timings(root)
    steps: list[tuple[str, Callable[[], bool], Callable[[], Any]]] = [
        ("data", lambda: data_done(config), lambda: write_data(config)),
        ("text_tokenizer", lambda: text_tokenizer_done(config), lambda: build_text_tokenizer(config)),
    ]
    vision_run = vision_stage(config)
    if vision_run is not None:
        steps.append(("vision", lambda: vision_done(config, vision_run), lambda: pretrain_vision(config, vision_run)))
    source = model_preference_source(config)
    for stage in config.stages:
        if stage == "dpo" and source is not None:
            steps.append(("model_preferences", lambda: stage_done(config, "dpo") or model_preferences_done(
                config, source), lambda: build_model_preferences(config, source)))
        steps.append(
            (stage, lambda stage=stage: stage_done(config, stage), lambda stage=stage: run_stage(config, stage))
        )
    for name, done, run in steps:
        if done():
            logger.info("%s: done in an earlier launch (%s s), kept", name, f"{timings.seconds.get(name, 0):.0f}")
            continue
        with timings.step(name):
            run()
    with timings.step("evaluation"):
        results = evaluate_pipeline(config, root / REPORT_DIR / EVAL_DIR)
    return write_report(config, results, timings.seconds, root / REPORT_DIR)
