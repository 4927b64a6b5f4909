"""Train one stage: ``python train.py CONFIG [key=value ...] [--resume PATH|last]``.

CONFIG is a run YAML (``vargpt.run_config.RunConfig``; ``_base_`` / ``defaults`` includes); ``key=value`` dotlist
overrides are merged last. The whole config is validated before anything is built, and the resolved config is
written to ``<output_dir>/config.yaml``. The run writes Lightning checkpoints to ``<output_dir>/checkpoints/``
(atomically; ``last.ckpt`` always points at the newest), metrics to ``<output_dir>/logs/version_<n>/metrics.csv`` (one
version per launch, so a resume keeps the earlier metrics), sample grids to ``<output_dir>/samples/``, in-training
evaluation (``callbacks.shapes_eval`` / ``callbacks.fid_eval``) to ``<output_dir>/evaluation/`` and, when the stage
ends, the safetensors export to ``<output_dir>/export/``.

``--resume`` restores model, optimizer, scheduler, step, the data position (epoch, batches of it already trained
on, generation resolution) and the RNG states: the interrupted epoch's stream is read again without the batches
already consumed (``datamodules.resume``), so a resumed run trains on the batches the uninterrupted run would have,
mid-epoch too; the stages seed their random corruption from the step, not from global RNG.

DPO with ``stage.dpo.precompute_reference: true`` (``dpo.corruption`` "sample" or "none") does not keep the reference
model beside the policy: ``PrecomputeReference`` computes its log-probs for the batches the fit will read at train
start (after a resume too), then frees it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from callbacks.export import ExportAtEnd, is_tokenizer_export, load_tokenizer_export
from callbacks.resolution import ResolutionSchedule, resolution_phase
from callbacks.samples import SampleGrid
from callbacks.throughput import Throughput
from datamodules.datamodule import ShardDataModule
from vargpt.atomic import atomic_open
from vargpt.compile import check_compile_options, compile_regions
from vargpt.config import ConfigError
from vargpt.run_config import SHARDING_STRATEGIES, RunConfig, load_run_config, save_resolved_config

CHECKPOINT_DIR, EXPORT_DIR, SAMPLES_DIR, LOG_DIR = "checkpoints", "export", "samples", "logs"
EVALUATION_DIR = "evaluation"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to the target, fsync, then rename over it.

    Lightning's own writer buffers the whole checkpoint in memory and commits through an fsspec transaction whose
    temporary file lives in the system temp folder, so the final move can cross file systems (a copy, not atomic).
    Local paths are written here beside the target instead; remote URLs keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_open(path, "wb", fsync=True) as stream:
            torch.save(checkpoint, stream)

    def remove_checkpoint(self, path: Any) -> None:
        filesystem = get_filesystem(path)
        if filesystem.exists(path):
            filesystem.rm(path, recursive=True)


class RNGState(lightning.Callback):
    """Saves and restores the Python, NumPy and torch (CPU and CUDA) RNG states with the checkpoint (rank 0's).

    Stored as tensors and plain numbers, so the checkpoint loads with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, python_state, gauss = random.getstate()
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, python_state, gauss = state_dict["python"]
        random.setstate((version, tuple(python_state.tolist()), gauss))
        kind, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def remaining_micro_batches(
    global_step: int, max_steps: int, consumed: int, batches_per_epoch: int, accumulate: int
) -> int:
    """How many training batches a fit at ``global_step`` with ``consumed`` batches of its data epoch behind it reads
    until ``max_steps``: Lightning steps the optimizer after every ``accumulate`` batches and at each epoch's end."""
    batches, step, position = 0, global_step, consumed
    while step < max_steps:
        batches += 1
        position += 1
        if position % accumulate == 0 or position == batches_per_epoch:
            step += 1
        if position == batches_per_epoch:
            position = 0
    return batches


def upcoming_batches(loader: Any, count: int) -> Iterator[dict[str, Any]]:
    """The next ``count`` batches of ``loader``, across as many epochs as they take."""
    while count > 0:
        for batch in loader:
            yield batch
            count -= 1
            if count == 0:
                return


class PrecomputeReference(lightning.Callback):
    """DPO with ``stage.dpo.precompute_reference``: reference log-probs computed ahead, on the training device.

    At train start (after a resume has restored the data position) it reads, with a second loader of the same
    deterministic stream started at the training loader's position, every preference batch the rest of the fit will
    train on, runs the frozen reference ``source`` over them under the training step's precision, hands the cache to
    the stage (``DPO.use_reference_logps``) and frees the reference, so it never stays beside the policy. A resolution
    switch inside the run is refused before any work (``check_runnable``): which batches it reaches depends on
    prefetching.
    """

    def __init__(self, source: str, config: Any = None, allow_missing: Sequence[str] = ()) -> None:
        self.source = source
        self.config = config  # the reference's VARGPTConfig (``export_model_config``); None = the export's own
        self.allow_missing = list(allow_missing)  # as the policy's (``init_from.allow_missing``)

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        from vargpt.checkpoints.vargpt import from_pretrained
        from vargpt.stages.dpo import precompute_reference_logps

        datamodule = trainer.datamodule
        position = trainer.train_dataloader.state_dict()
        count = remaining_micro_batches(
            trainer.global_step, trainer.max_steps, position["consumed"], datamodule.config.batches_per_epoch,
            trainer.accumulate_grad_batches,
        )
        mirror = ShardDataModule(datamodule.config, datamodule.tokenizer, trainer.global_rank, trainer.world_size)
        current = datamodule.generation_resolution
        mirror.set_generation_resolution(current.size, current.schedule)
        loader = mirror.train_dataloader()
        loader.load_state_dict(position)
        started = time.perf_counter()
        reference, _ = from_pretrained(self.source, config=self.config, allow_missing=self.allow_missing)
        reference.attach_tokenizer(datamodule.tokenizer)
        reference = trainer.precision_plugin.convert_module(reference).to(pl_module.device)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            batches = (trainer.strategy.batch_to_device(batch) for batch in upcoming_batches(loader, count))
            cache = precompute_reference_logps(reference, batches, pl_module.config)
        del reference, batches, loader, mirror
        gc.collect()
        if pl_module.device.type == "cuda":
            torch.cuda.empty_cache()
        pl_module.use_reference_logps(cache)
        rank_zero_info(f"reference log-probs of {len(cache.values)} preference pairs ({count} batches) computed ahead "
                       f"in {time.perf_counter() - started:.1f}s; the reference model is freed")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("config", type=Path, help="run YAML (configs/quickstart/<stage>.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=100")
    parser.add_argument(
        "--resume", default=None, help="a Lightning checkpoint, or 'last' for <output_dir>/checkpoints/last.ckpt"
    )
    return parser.parse_args(argv)


def resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` names (``last`` = the run's newest); it must exist."""
    if resume is None:
        return None
    path = output_dir / CHECKPOINT_DIR / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
    return path


def build_strategy(run: RunConfig) -> Any:
    """The Lightning strategy of ``trainer.strategy`` (FSDP wraps every LLM layer and decoder block)."""
    options = run.trainer.strategy
    if options.name == "auto":
        return "auto"
    if options.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            find_unused_parameters=options.find_unused_parameters, process_group_backend=options.process_group_backend
        )
    if options.name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

        from vargpt.decoder.block import DecoderBlock

        return FSDPStrategy(
            auto_wrap_policy={Qwen2VLDecoderLayer, DecoderBlock},
            sharding_strategy=options.sharding_strategy,
            state_dict_type=options.state_dict_type,
            cpu_offload=options.cpu_offload,
            use_orig_params=True,  # frozen and trainable parameters share FSDP units (VARGPT §4.1 groups)
            process_group_backend=options.process_group_backend,
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=options.deepspeed_stage, offload_optimizer=options.offload_optimizer)


def load_text_tokenizer_of(run: RunConfig) -> Any | None:
    """The configured tokenizer folder, or None (the weights' own tokenizer is used then)."""
    if run.text_tokenizer is None:
        return None
    from vargpt.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(run.text_tokenizer)


def load_into_tokenizer(vae: torch.nn.Module, source: str) -> None:
    """Load ``init_from.bsq_vae`` into ``vae``: our tokenizer export folder or the released ``.pth``."""
    if is_tokenizer_export(source):
        load_tokenizer_export(source, into=vae)
        return
    from vargpt.checkpoints.bsq_vae import load_bsq_vae

    vae.load_state_dict(load_bsq_vae(source, config=vae.config).state_dict())


def export_model_config(run: RunConfig, export: str) -> Any:
    """The model config a stage builds when it starts from ``export``: the run's ``model`` when it names one, else
    the folder's own (our export's config.json, or what a released folder implies). The run's wins so that a stage
    can change what does not change the weights' shapes (a loss weighting, self-correction, condition dropout) or add
    a module (with ``init_from.allow_missing``); each field where it differs from the folder's config is reported,
    so that a model file out of step with the export is seen. Sizes that do not fit the weights fail the strict
    load, naming the parameters."""
    from vargpt.checkpoints.vargpt import config_from_released, detect_layout, export_config, read_config_json
    from vargpt.config_io import config_differences

    if detect_layout(export) == "export":
        saved = export_config(export)
        if not run.model:
            return saved
    elif not run.model:
        return None  # the released VARGPT-v1.1 folder: from_pretrained builds what its config.json implies
    else:
        try:  # the 2B / d32 defaults: not a config at all for a folder of other sizes, which is why one is given
            saved = config_from_released(read_config_json(export))
        except ConfigError:
            return run.model_config()
    config = run.model_config()
    changes = config_differences(saved, config)
    if changes:
        named = run.model if isinstance(run.model, str) else "the run's inline model"
        rank_zero_info(f"model: {named} differs from the config of {export} in {len(changes)} field(s); the run's "
                       f"values are used: " + "; ".join(changes))
    return config


def build_model(run: RunConfig, tokenizer: Any | None) -> tuple[Any, Any | None]:
    """The stage's starting weights (``init_from``) and the text tokenizer to train with."""
    from vargpt.checkpoints.vargpt import from_pretrained, init_from_parts
    from vargpt.model import VARGPT

    start = run.init_from
    if start.export is not None:
        model, own_tokenizer = from_pretrained(
            start.export, allow_missing=start.allow_missing, config=export_model_config(run, start.export)
        )
    elif start.qwen2_vl is not None:
        if start.bsq_vae is None:
            raise ConfigError("init_from: parts need bsq_vae as well as qwen2_vl and infinity")
        model = init_from_parts(start.qwen2_vl, start.infinity, start.bsq_vae, config=run.model_config())
        own_tokenizer = model.text_tokenizer
    else:
        torch.manual_seed(run.stage.seed)
        model = VARGPT(run.model_config())
        own_tokenizer = None
        if start.bsq_vae is not None:
            load_into_tokenizer(model.tokenizer, start.bsq_vae)
        if start.vision is not None:
            from vargpt.checkpoints.vision import load_vision_tower

            load_vision_tower(model, start.vision)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if tokenizer is None:
        raise ConfigError("text_tokenizer is null and init_from gives no tokenizer: set text_tokenizer to a folder")
    model.attach_tokenizer(tokenizer)
    return model.train(), tokenizer


def build_stage_module(run: RunConfig, tokenizer: Any | None) -> tuple[lightning.LightningModule, Any | None]:
    """The stage's LightningModule around its starting weights (and, for DPO, the frozen reference)."""
    from vargpt.stages import STAGES

    name = run.stage.stage
    if name not in STAGES:
        raise ConfigError(f"stage {name!r} has no LightningModule yet; available: {sorted(STAGES)}")
    if name == "tokenizer":
        from vargpt.tokenizer import BSQVAE

        torch.manual_seed(run.stage.seed)
        vae = BSQVAE(run.model_config().tokenizer)
        if run.init_from.bsq_vae is not None:
            load_into_tokenizer(vae, run.init_from.bsq_vae)
        return STAGES[name](vae, run.stage), tokenizer
    model, tokenizer = build_model(run, tokenizer)
    reference = None
    if name == "dpo" and not run.stage.dpo.precompute_reference:  # else PrecomputeReference uses it at train start
        from vargpt.checkpoints.vargpt import from_pretrained

        source = dpo_reference_source(run)
        reference, _ = from_pretrained(
            source, config=export_model_config(run, source), allow_missing=run.init_from.allow_missing
        )
        reference.attach_tokenizer(tokenizer)
    return STAGES[name](model, run.stage, reference=reference), tokenizer


def dpo_reference_source(run: RunConfig) -> str:
    """The frozen reference of a DPO run: ``reference_from``, else the policy's ``init_from.export``."""
    source = run.reference_from or run.init_from.export
    if source is None:
        raise ConfigError("dpo needs reference_from or init_from.export (the frozen previous stage)")
    return source


def build_callbacks(run: RunConfig, output_dir: Path) -> list[lightning.Callback]:
    """Checkpointing, RNG state, resolution phases, throughput, sample grids, export, progress bar."""
    trainer = run.trainer
    callbacks: list[lightning.Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / CHECKPOINT_DIR,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=trainer.checkpoint_every_n_steps,
            save_top_k=trainer.keep_checkpoints,
            monitor="step",
            mode="max",
            save_last=True,
        ),
        RNGState(),
        ExportAtEnd(output_dir / EXPORT_DIR),
    ]
    if run.resolution_phases:
        callbacks.append(ResolutionSchedule([
            resolution_phase(phase.step, phase.size, pn=phase.pn, schedule=phase.schedule, stride=phase.stride)
            for phase in run.resolution_phases
        ]))
    if run.callbacks.throughput.enabled:
        callbacks.append(Throughput(run.callbacks.throughput.peak_flops, run.callbacks.throughput.window))
    samples = run.callbacks.samples
    if samples.every_n_steps and run.stage.stage != "tokenizer":
        callbacks.append(SampleGrid(
            samples.prompts, samples.every_n_steps, output_dir / SAMPLES_DIR, seed=samples.seed,
            generation_kwargs={"cfg": samples.cfg, "temperature": samples.temperature, "top_p": samples.top_p},
        ))
    callbacks += build_evaluation_callbacks(run, output_dir)
    if run.stage.stage == "dpo" and run.stage.dpo.precompute_reference:
        source = dpo_reference_source(run)
        callbacks.append(PrecomputeReference(source, export_model_config(run, source), run.init_from.allow_missing))
    if trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    return callbacks


def build_evaluation_callbacks(run: RunConfig, output_dir: Path) -> list[lightning.Callback]:
    """``callbacks.shapes_eval`` / ``callbacks.fid_eval`` with ``every_n_steps > 0`` as ``ShapesEvaluation`` /
    ``FIDEvaluation`` writing under ``<output_dir>/evaluation/`` (not for the tokenizer stage: nothing generates)."""
    if run.stage.stage == "tokenizer":
        return []
    from callbacks.evaluation import FIDEvaluation, ShapesEvaluation
    from vargpt.eval.model_adapters import GenerationSettings

    callbacks: list[lightning.Callback] = []
    shapes = run.callbacks.shapes_eval
    if shapes.every_n_steps:
        callbacks.append(ShapesEvaluation(
            shapes.every_n_steps, output_dir / EVALUATION_DIR / "shapes", per_task=shapes.per_task, seed=shapes.seed,
            size=shapes.size, batch_size=shapes.batch_size,
            settings=GenerationSettings(cfg=shapes.cfg, temperature=shapes.temperature, top_p=shapes.top_p),
        ))
    fid = run.callbacks.fid_eval
    if fid.every_n_steps:
        callbacks.append(FIDEvaluation(
            fid.every_n_steps, output_dir / EVALUATION_DIR / "fid", fid.prompt_list(), fid.reference,
            fid.inception_weights, seed=fid.seed, resolution=fid.resolution, batch_size=fid.batch_size,
            settings=GenerationSettings(cfg=fid.cfg, temperature=fid.temperature, top_p=fid.top_p), kid=fid.kid,
        ))
    return callbacks


def build_trainer(run: RunConfig, output_dir: Path) -> lightning.Trainer:
    """A ``lightning.Trainer`` from ``run.trainer``."""
    options = run.trainer
    return lightning.Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        num_nodes=options.num_nodes,
        strategy=build_strategy(run),
        precision=options.precision,
        max_steps=options.max_steps,
        max_epochs=-1,
        gradient_clip_val=options.gradient_clip_val,
        accumulate_grad_batches=options.accumulate_grad_batches,
        log_every_n_steps=options.log_every_n_steps,
        val_check_interval=options.val_every_n_steps,
        check_val_every_n_epoch=None if options.val_every_n_steps else 1,
        limit_val_batches=options.limit_val_batches if options.val_every_n_steps else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=options.progress_bar,
        deterministic=options.deterministic,
        logger=CSVLogger(output_dir, name=LOG_DIR),  # logs/version_<n>/: one per launch, resumes included
        callbacks=build_callbacks(run, output_dir),
        plugins=[AtomicCheckpointIO()] if options.strategy.name in ("auto", "ddp") else None,
        default_root_dir=output_dir,
    )


def compile_stage(module: lightning.LightningModule, run: RunConfig) -> None:
    """``trainer.compile``: compile the model's transformer blocks for the training steps (``vargpt.compile``)."""
    options = run.trainer.compile
    if not options.enabled:
        return
    regions = compile_regions(module.model, options.targets, backend=options.backend, mode=options.mode,
                              dynamic=options.dynamic, if_unavailable=options.if_unavailable)
    rank_zero_info(f"trainer.compile: {regions.blocks} blocks compile ({options.backend}) at the first training step")


def check_runnable(run: RunConfig, resume: str | None) -> None:
    """What a valid config can still not run with here, found before any work: a missing ``--resume`` checkpoint,
    ``trainer.compile`` or the Muon optimizer with a sharding strategy, a compile backend or mode this torch does not
    have, DeepSpeed not installed, FID evaluation files that are missing, DPO with precomputed reference log-probs and
    a resolution switch inside the run (the precompute pass cannot know which batches the switch reaches) or without
    a reference to precompute with."""
    resume_path(resume, Path(run.output_dir))
    options = run.trainer.compile
    if options.enabled:
        if run.trainer.strategy.name in SHARDING_STRATEGIES:
            raise ConfigError(f"trainer.compile with trainer.strategy.name {run.trainer.strategy.name!r}: compiling is "
                              "tested with the auto and ddp strategies only; set trainer.compile.enabled=false")
        check_compile_options(options.targets, options.backend, options.mode, options.if_unavailable)
    if run.stage.optimizer.name == "muon" and run.trainer.strategy.name in SHARDING_STRATEGIES:
        raise ConfigError(f"stage.optimizer.name 'muon' with trainer.strategy.name {run.trainer.strategy.name!r}: Muon "
                          "orthogonalises whole weight matrices, which a sharding strategy splits across ranks; use "
                          "'adamw' or the ddp strategy")
    if run.trainer.strategy.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.strategy.name is 'deepspeed' but the deepspeed package is not installed; use 'fsdp'")
    fid = run.callbacks.fid_eval
    if fid.every_n_steps and run.stage.stage != "tokenizer":
        if not Path(fid.reference).is_dir():
            raise ConfigError(f"callbacks.fid_eval.reference: no image folder at {fid.reference}")
        if not Path(fid.inception_weights).is_file():
            raise ConfigError(f"callbacks.fid_eval.inception_weights: no Inception weights file at "
                              f"{fid.inception_weights} (torch-fidelity's weights-inception-2015-12-05 .pth)")
        fid.prompt_list()
    if run.stage.stage == "dpo" and run.stage.dpo.precompute_reference:
        dpo_reference_source(run)
        switches = [phase.step for phase in run.resolution_phases if 0 < phase.step < run.trainer.max_steps]
        if switches:
            raise ConfigError(
                f"stage.dpo.precompute_reference with resolution_phases switching at step(s) {switches}: which "
                "batches a switch reaches depends on prefetching, so reference log-probs computed ahead could miss "
                "them; run one resolution per DPO run (as the recipe's 256 px and 512 px DPO stages) or set "
                "stage.dpo.precompute_reference: false"
            )


def train(run: RunConfig, resume: str | None = None) -> Path:
    """Run one stage to ``trainer.max_steps``; returns the output folder."""
    output_dir = Path(run.output_dir)
    checkpoint = resume_path(resume, output_dir)
    lightning.seed_everything(run.stage.seed, workers=True, verbose=False)
    save_resolved_config(run, output_dir)
    module, tokenizer = build_stage_module(run, load_text_tokenizer_of(run))
    compile_stage(module, run)
    datamodule = ShardDataModule(run.data, tokenizer)
    trainer = build_trainer(run, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        run = load_run_config(arguments.config, arguments.overrides)
        check_runnable(run, arguments.resume)
    except (ConfigError, FileNotFoundError) as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    train(run, arguments.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
