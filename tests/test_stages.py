"""Stage modules: config validation, optimizer groups, the warmup-cosine schedule, step-seeded corruption, and a
short Lightning fit per stage that logs losses and parameter counts."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from helpers_tiny_model import make_batch, mixed_samples, tiny_image, tiny_model
from vargpt.config import ConfigError
from vargpt.stages import DEFAULT_TRAINABLE, STAGES, StageConfig
from vargpt.stages.base import corruption_seed, decay_parameter_groups, warmup_cosine_factor


class RecordingLogger(Logger):
    """Keeps every logged metric in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {key for _, metrics in self.metrics for key in metrics}


def generation_samples():
    return [
        {"messages": [{"role": "user", "content": "a red circle on a blue square"},
                      {"role": "assistant", "content": "here is the picture you asked for<image_gen>"}],
         "targets": [tiny_image(2)]},
        mixed_samples()[2],
    ]


def fit(module, batches, max_steps):
    logger = RecordingLogger()
    trainer = lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=max_steps, check_val_every_n_epoch=None,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(module, loader, loader)
    return trainer, logger


def test_stage_config_defaults_follow_the_reference():
    config = StageConfig(stage="generation_sft")
    assert config.trainable == ["decoder", "in_projector", "out_projector", "start_condition"]
    assert config.optimizer.lr == 5e-5 and config.optimizer.betas == (0.9, 0.999)
    assert config.optimizer.weight_decay == 0.0 and config.schedule.warmup_ratio == 0.1
    assert config.dpo.beta == 0.1 and config.dpo.loss == "sigmoid"
    assert StageConfig(stage="alignment").trainable == ["in_projector", "out_projector", "start_condition"]
    assert StageConfig(stage="understanding_sft").trainable == ["llm", "lm_head"]
    assert set(DEFAULT_TRAINABLE) == {"tokenizer", "alignment", "understanding_sft", "generation_sft", "dpo",
                                      "editing_sft"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stage": "pretraining"}, "stage must be one of"),
        ({"optimizer": {"lr": 0.0}}, "optimizer.lr"),
        ({"optimizer": {"betas": (0.9, 1.5)}}, "optimizer.betas"),
        ({"optimizer": {"learning_rate": 1e-4}}, "optimizer:"),
        ({"schedule": {"warmup_ratio": 1.0}}, "schedule.warmup_ratio"),
        ({"schedule": {"total_steps": 0}}, "schedule.total_steps"),
        ({"dpo": {"loss": "kto"}}, "dpo.loss"),
        ({"dpo": {"precompute_reference": True}}, "dpo.corruption"),
        ({"image_loss_weight": -1.0}, "image_loss_weight"),
        ({"trainable": []}, "trainable is empty"),
        ({"stage": "tokenizer", "trainable": ["decoder"]}, "tokenizer stage"),
        ({"optimizer": {"lr_multipliers": {"visual": 3.0}}}, "lr_multipliers has unknown group 'visual'"),
        ({"optimizer": {"lr_multipliers": {"decoder": 0.0}}}, "optimizer.lr_multipliers.decoder must be a number > 0"),
        ({"optimizer": {"lr_multipliers": {"decoder": "fast"}}}, "optimizer.lr_multipliers.decoder"),
        ({"optimizer": {"lr_multipliers": [3.0]}}, "optimizer.lr_multipliers must be a mapping"),
        ({"stage": "generation_sft", "optimizer": {"lr_multipliers": {"vision": 3.0}}},
         r"names group\(s\) \['vision'\] that stage 'generation_sft' does not train"),
    ],
)
def test_stage_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        StageConfig(**fields)


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 100, 0.1, 0.0) == 0.0
    assert warmup_cosine_factor(5, 100, 0.1, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(10, 100, 0.1, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 100, 0.1, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100, 0.1, 0.0) == pytest.approx(0.0)
    assert warmup_cosine_factor(100, 100, 0.1, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(0, 10, 0.0, 0.0) == 1.0


def test_no_weight_decay_on_biases_norms_and_vectors():
    model = tiny_model()
    model.requires_grad_(True)
    groups = decay_parameter_groups(model.named_parameters(), 0.1)
    decayed = {id(parameter) for parameter in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for name, parameter in model.named_parameters():
        assert (id(parameter) in decayed) == (parameter.ndim >= 2 and not name.endswith(".bias")), name


def test_lr_multipliers_scale_their_groups_learning_rate_through_the_schedule():
    model = tiny_model()
    config = StageConfig(
        stage="understanding_sft",
        trainable=["vision", "merger", "llm", "lm_head"],
        optimizer={"lr": 1e-3, "weight_decay": 0.1, "lr_multipliers": {"vision": 3, "merger": 0.5}},
        schedule={"warmup_ratio": 0.0, "total_steps": 10},
    )
    module = STAGES["understanding_sft"](model, config)
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    expected = {"vision": 3e-3, "merger": 5e-4, "llm": 1e-3, "lm_head": 1e-3}
    lr_of = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable parameter once, nothing frozen
    for group, parameters in module.parameter_groups().items():
        for name, parameter in parameters.items():
            if group in expected:
                assert lr_of[id(parameter)] == pytest.approx(expected[group]), name
            else:
                assert id(parameter) not in lr_of, name
    decays = {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert decays == {(lr, decay) for lr in (3e-3, 5e-4, 1e-3) for decay in (0.1, 0.0)}
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = warmup_cosine_factor(5, 10, 0.0, config.schedule.min_lr_ratio)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor)
    assert {round(group["initial_lr"], 9) for group in optimizer.param_groups} == {3e-3, 5e-4, 1e-3}


def test_corruption_seed_is_a_pure_function_of_the_batch_place():
    assert corruption_seed(0, 5, 0, 0) == corruption_seed(0, 5, 0, 0)
    places = [(step, rank, micro) for step in range(50) for rank in range(100) for micro in range(4)]
    assert len({corruption_seed(0, *place) for place in places}) == len(places)
    assert corruption_seed(0, 1, 0, 0) != corruption_seed(1, 1, 0, 0)
    model = tiny_model()
    module = STAGES["generation_sft"](model, StageConfig(seed=3))
    first = torch.rand(4, generator=module.corruption_generator(0))
    assert torch.equal(first, torch.rand(4, generator=module.corruption_generator(0)))
    batch = make_batch(generation_samples())
    losses = [module.training_step(batch, 0).item() for _ in range(2)]
    assert losses[0] == losses[1]


def test_image_loss_weight_override():
    model = tiny_model()
    batch = make_batch(generation_samples())
    module = STAGES["generation_sft"](model, StageConfig(image_loss_weight=0.5))
    output = model.training_forward(batch, None)
    losses = module.sft_losses(output)
    assert losses["loss"].item() == pytest.approx((output.text_loss + 0.5 * output.image_loss).item())


def test_stage_checks_its_config_stage():
    with pytest.raises(ValueError, match="config.stage"):
        STAGES["generation_sft"](tiny_model(), StageConfig(stage="alignment"))


def test_generation_sft_fit_logs_losses_counts_and_steps_the_schedule():
    model = tiny_model()
    config = StageConfig(stage="generation_sft", schedule={"total_steps": 4, "warmup_ratio": 0.5},
                         optimizer={"lr": 1e-3})
    module = STAGES["generation_sft"](model, config)
    batches = [make_batch(generation_samples())] * 2
    trainer, logger = fit(module, batches, max_steps=3)
    keys = logger.keys()
    assert {"train/loss", "train/text_loss", "train/image_loss", "val/loss", "val/image_loss"} <= keys
    assert {"train/bit_accuracy", "train/bit_accuracy_last"} <= keys
    assert all(0.0 <= metrics["train/bit_accuracy_last"] <= 1.0 for _, metrics in logger.metrics
               if "train/bit_accuracy_last" in metrics)
    assert {"parameters/trainable/decoder", "parameters/trainable/in_projector", "parameters/frozen"} <= keys
    counts = module.parameter_counts()
    assert counts["frozen"] + sum(v for k, v in counts.items() if k.startswith("trainable/")) == sum(
        p.numel() for p in model.parameters())
    assert module.model.decoder.training and not module.model.tokenizer.training
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 3
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(math.isfinite(metrics["train/loss"]) for _, metrics in logger.metrics if "train/loss" in metrics)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = make_batch(mixed_samples())
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        module = STAGES["understanding_sft"](
            model, StageConfig(stage="understanding_sft", activation_checkpointing=checkpointing))
        module.train()
        loss = model.training_forward(batch, None).loss
        loss.backward()
        results.append((loss.item(), model.backbone.language_model.layers[0].mlp.up_proj.weight.grad.clone()))
        assert model.backbone.language_model.gradient_checkpointing == checkpointing
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1])


def train_losses(logger):
    return {step: metrics["train/loss"] for step, metrics in logger.metrics if "train/loss" in metrics}


def test_dpo_fit_logs_rewards_and_resumes_exactly(tmp_path):
    import copy

    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_dpo import preference_batch

    def dpo_stage():
        model = tiny_model(condition_drop=0.5)
        config = StageConfig(stage="dpo", seed=2, optimizer={"lr": 1e-3},
                             schedule={"total_steps": 4, "warmup_ratio": 0.25})
        return STAGES["dpo"](model, config, reference=copy.deepcopy(model))

    batches = [preference_batch([0, 1])] * 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    logger = RecordingLogger()
    trainer = lightning.Trainer(
        max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1, callbacks=[checkpoint],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(dpo_stage(), loader)
    assert {"train/reward_margin", "train/reward_accuracy", "train/rewards_chosen", "train/dpo_loss"} <= logger.keys()
    straight = train_losses(logger)
    saved = torch.load(sorted(tmp_path.glob("*step=2*.ckpt"))[0], weights_only=False)
    assert not any(name.startswith("reference.") for name in saved["state_dict"])

    resumed_logger = RecordingLogger()
    resumed = lightning.Trainer(
        max_steps=4, accelerator="cpu", logger=resumed_logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    resumed.fit(dpo_stage(), loader, ckpt_path=sorted(tmp_path.glob("*step=2*.ckpt"))[0])
    after = train_losses(resumed_logger)
    assert sorted(after) == [2, 3]
    for step in (2, 3):
        assert after[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)


def test_stage_config_round_trips_through_the_yaml_builder():
    from vargpt.config_io import config_to_dict, dataclass_from_dict

    data = {"stage": "dpo", "trainable": ["decoder", "llm"], "optimizer": {"lr": 1e-4, "betas": [0.9, 0.95]},
            "dpo": {"corruption": "sample", "precompute_reference": True, "loss": "ipo"}}
    data["optimizer"]["lr_multipliers"] = {"llm": 0.1}
    config = dataclass_from_dict(StageConfig, data)
    assert config.optimizer.betas == (0.9, 0.95) and config.dpo.loss == "ipo"
    assert config.optimizer.lr_multipliers == {"llm": 0.1}
    assert dataclass_from_dict(StageConfig, config_to_dict(config)) == config
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        dataclass_from_dict(StageConfig, {"optimizer": {"lrr": 1e-4}})
