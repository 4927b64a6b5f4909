"""Muon with AdamW (vargpt/optim.py): its two updates equal torch's Muon and AdamW on their own parameters, the
stage optimizer puts the hidden matrices on Muon and the rest on AdamW, and its state survives a checkpoint."""

from __future__ import annotations

import datetime
import io
import json
import math

import lightning
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers_tiny_model import make_batch, mixed_samples, tiny_model
from vargpt.config import ConfigError
import vargpt.optim
from vargpt.optim import MuonAdamW, orthogonalization_cost, orthogonalize, shard_owners
from vargpt.stages import STAGES, StageConfig
from vargpt.stages.base import build_optimizer, muon_parameters


def _gradients(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


def _run(optimizer, params, gradients):
    for step in gradients:
        for param, grad in zip(params, step):
            param.grad = grad.clone()
        optimizer.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_groups_step_as_torch_muon_with_the_adamw_rms_rule(nesterov):
    shapes = [(24, 8), (8, 24), (16, 16)]
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    gradients = _gradients(shapes, 4)
    _run(MuonAdamW([{"params": ours, "use_muon": True, "weight_decay": 0.1}], lr=0.02, momentum=0.9,
                   nesterov=nesterov), ours, gradients)
    _run(torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                          adjust_lr_fn="match_rms_adamw"), theirs, gradients)
    for a, b, s in zip(ours, theirs, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adamw_groups_step_as_torch_adamw():
    shapes = [(6, 5), (5,), (3, 2, 2)]
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    gradients = _gradients(shapes, 5)
    options = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    _run(MuonAdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}], **options),
         ours, gradients)
    _run(torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1}, {"params": theirs[2:], "weight_decay": 0.0}],
                           foreach=False, **options), theirs, gradients)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_fused_adamw_groups_step_as_torch_fused_adamw():
    shapes = [(6, 5), (5,)]
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    gradients = _gradients(shapes, 3)
    _run(MuonAdamW([{"params": ours, "weight_decay": 0.1}], lr=3e-3, fused=True), ours, gradients)
    _run(torch.optim.AdamW([{"params": theirs, "weight_decay": 0.1}], lr=3e-3, fused=True), theirs, gradients)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# The Muon matrices (two groups, as lr_multipliers make them) and one AdamW matrix of the sharded test.
SHARDED_SHAPES = [(24, 8), (8, 24), (16, 16), (32, 32), (12, 40), (40, 12), (4, 4)]


def _sharded_setup():
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(SHARDED_SHAPES)]
    params = [nn.Parameter(p.clone()) for p in start]
    optimizer = MuonAdamW([{"params": params[:3], "use_muon": True, "weight_decay": 0.1},
                           {"params": params[3:6], "use_muon": True, "lr": 0.04},
                           {"params": params[6:]}], lr=0.02)
    return params, optimizer


def _sharded_rank(rank: int, root: str, world_size: int) -> None:
    store = dist.FileStore(f"{root}/store", world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        calls = []
        plain = vargpt.optim.orthogonalize
        vargpt.optim.orthogonalize = lambda matrix, steps: calls.append(tuple(matrix.shape)) or plain(matrix, steps)
        params, optimizer = _sharded_setup()
        _run(optimizer, params, _gradients(SHARDED_SHAPES, 3))
        torch.save([p.detach() for p in params], f"{root}/rank{rank}.pt")
        with open(f"{root}/rank{rank}.json", "w") as file:
            json.dump(calls, file)
    finally:
        dist.destroy_process_group()


def test_sharded_orthogonalization_shares_the_work_and_equals_one_process(tmp_path):
    world_size = 2
    # spawned, not forked: a child forked from a process whose OpenMP pool has run can hang in its first matmul
    mp.start_processes(_sharded_rank, args=(str(tmp_path), world_size), nprocs=world_size, join=True,
                       start_method="spawn")
    params, optimizer = _sharded_setup()
    _run(optimizer, params, _gradients(SHARDED_SHAPES, 3))
    for rank in range(world_size):
        for ours, theirs in zip(torch.load(tmp_path / f"rank{rank}.pt"), params):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    calls = [[tuple(shape) for shape in json.loads((tmp_path / f"rank{rank}.json").read_text())]
             for rank in range(world_size)]
    muon = SHARDED_SHAPES[:6]
    assert sorted(calls[0] + calls[1]) == sorted(muon * 3)  # each matrix orthogonalised once a step, by one process
    assert all(0 < len(share) < len(muon) * 3 for share in calls)


def test_shard_owners_balance_the_newton_schulz_cost():
    shapes = [torch.Size(shape) for shape in [(128, 512), (512, 128), (128, 128), (128, 128), (64, 64), (16, 16)]]
    for world_size in (1, 2, 3):
        owners = shard_owners(shapes, world_size)
        assert owners == shard_owners(shapes, world_size) and set(owners) <= set(range(world_size))
        loads = [sum(orthogonalization_cost(s) for s, o in zip(shapes, owners) if o == r) for r in range(world_size)]
        assert max(loads) - min(loads) <= max(orthogonalization_cost(s) for s in shapes)
    assert shard_owners(shapes, 2)[:2] == [0, 1]  # the two largest go to different processes


def test_orthogonalize_brings_every_singular_value_near_one():
    matrix = torch.randn(32, 12, generator=torch.Generator().manual_seed(3)) @ torch.diag(torch.logspace(-1, 1, 12))
    assert torch.linalg.cond(matrix) > 50
    values = torch.linalg.svdvals(orthogonalize(matrix).float())
    assert values.min() > 0.5 and values.max() < 1.5  # the quintic's band, from singular values two decades apart
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.randn(2, 3, 4))


def test_a_muon_group_rejects_non_matrix_parameters_and_bad_options():
    with pytest.raises(ValueError, match="non-matrix parameters"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(4))], "use_muon": True}])
    with pytest.raises(ValueError, match="momentum"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(4, 4))]}], momentum=1.0)


def test_stage_optimizer_muon_takes_the_hidden_matrices_and_keeps_multipliers():
    model = tiny_model()
    config = StageConfig(
        stage="generation_sft",
        trainable=["llm", "decoder", "in_projector", "out_projector", "start_condition"],
        optimizer={"name": "muon", "lr": 1e-3, "weight_decay": 0.1, "lr_multipliers": {"decoder": 2}},
        schedule={"warmup_ratio": 0.0, "total_steps": 10},
    )
    module = STAGES["generation_sft"](model, config)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MuonAdamW)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert set(group_of) == {id(p) for p in trainable.values()}  # each trainable parameter once
    on_muon = {name for name, p in trainable.items() if group_of[id(p)]["use_muon"]}
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
    hidden = {f"{name}.weight" for name, layer in layers.items() if layer.weight.requires_grad
              and not name.endswith(("lm_head", "decoder.word_embed", "decoder.head.proj", "decoder.sequential.out"))}
    assert on_muon == hidden and any(".layers.0.mlp." in name for name in on_muon)
    assert not any(name.endswith(("head.proj.weight", "word_embed.weight", "embed_tokens.weight")) for name in on_muon)
    decoder = {id(p) for p in module.parameter_groups()["decoder"].values()}
    for p in trainable.values():
        assert group_of[id(p)]["lr"] == pytest.approx(2e-3 if id(p) in decoder else 1e-3)
    assert {g["weight_decay"] for g in optimizer.param_groups if g["use_muon"]} == {0.1}
    assert optimizer.fused is False and optimizer.shard_orthogonalization  # CPU parameters: unfused, as AdamW
    config.optimizer.fused, config.optimizer.muon_shard = True, False
    optimizer = build_optimizer(module, config)
    assert optimizer.fused is True and not optimizer.shard_orthogonalization


def test_muon_parameters_skips_frozen_and_excluded_layers():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    net[2].weight.requires_grad_(False)
    assert muon_parameters(net, ["3"]) == {id(net[0].weight)}
    assert muon_parameters(net, ["*"]) == set()


def test_muon_state_round_trips_through_a_state_dict():
    def make():
        model = tiny_model()
        config = StageConfig(stage="understanding_sft", trainable=["merger", "llm", "lm_head"],
                             optimizer={"name": "muon", "lr": 1e-3})
        module = STAGES["understanding_sft"](model, config)
        return module, build_optimizer(module, config)

    def step(module, optimizer, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()

    first, first_optimizer = make()
    step(first, first_optimizer, 0)
    second, second_optimizer = make()
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    second.load_state_dict(checkpoint["model"])
    second_optimizer.load_state_dict(checkpoint["optimizer"])
    step(first, first_optimizer, 1)
    step(second, second_optimizer, 1)
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "optimizer, needle",
    [({"name": "sgd"}, "optimizer.name"), ({"muon_momentum": 1.0}, "optimizer.muon_momentum"),
     ({"muon_exclude": "lm_head"}, "optimizer.muon_exclude"), ({"muon_shard": "yes"}, "optimizer.muon_shard")],
)
def test_optimizer_config_names_the_bad_field(optimizer, needle):
    with pytest.raises(ConfigError, match=needle):
        StageConfig(stage="generation_sft", optimizer=optimizer)


def test_a_muon_stage_fits_through_lightning_and_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_stages import RecordingLogger

    def stage():
        config = StageConfig(stage="generation_sft", trainable=["llm", "decoder", "in_projector", "out_projector"],
                             optimizer={"name": "muon", "lr": 1e-3}, schedule={"total_steps": 4, "warmup_ratio": 0.25})
        return STAGES["generation_sft"](tiny_model(), config)

    def losses(logger):
        return {step: metrics["train/loss"] for step, metrics in logger.metrics if "train/loss" in metrics}

    def trainer(logger, callbacks=()):
        return lightning.Trainer(max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1,
                                 callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                                 enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)

    loader = torch.utils.data.DataLoader([make_batch(mixed_samples())] * 2, batch_size=None,
                                         collate_fn=lambda batch: batch)
    straight_logger = RecordingLogger()
    module = stage()
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer(straight_logger, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)]).fit(
        module, loader)
    moved = [name for name, p in module.named_parameters() if not torch.equal(p, start[name])]
    assert any(".layers.0.mlp." in name for name in moved) and any("decoder.head.proj" in name for name in moved)
    straight = losses(straight_logger)
    assert sorted(straight) == [0, 1, 2, 3] and all(math.isfinite(loss) for loss in straight.values())

    resumed_logger = RecordingLogger()
    trainer(resumed_logger).fit(stage(), loader, ckpt_path=sorted(tmp_path.glob("*step=2*.ckpt"))[0])
    after = losses(resumed_logger)
    assert sorted(after) == [2, 3]
    for step in (2, 3):
        assert after[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
