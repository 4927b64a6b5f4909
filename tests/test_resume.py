"""A run interrupted after N steps and resumed with ``--resume`` logs the same losses as an uninterrupted run, and
checkpoints are written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train_cli import (  # one_intra_op_thread: test_train_cli's autouse fixture, for these runs too
    load_train_module,
    logged,
    one_intra_op_thread,
    tiny_run,
    write_config,
    write_tiny_assets,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


def test_resumed_run_logs_the_losses_of_an_uninterrupted_run(assets: Path, tmp_path: Path) -> None:
    train = load_train_module()
    whole = write_config(tmp_path / "whole.yaml", tiny_run(assets, tmp_path / "whole"))
    assert train.main([str(whole)]) == 0
    split = write_config(tmp_path / "split.yaml", tiny_run(assets, tmp_path / "split"))
    assert train.main([str(split), "trainer.max_steps=2"]) == 0
    assert train.main([str(split), "--resume", "last"]) == 0

    expected = logged(tmp_path / "whole", "train/loss")
    resumed = logged(tmp_path / "split", "train/loss")
    assert sorted(expected) == sorted(resumed) == [0, 1, 2, 3]
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-7)
    last = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and "ShardDataModule" in last and "RNGState" in "".join(last["callbacks"])


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path: Path) -> None:
    io = load_train_module().AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    with pytest.raises(Exception):
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, target)
    assert torch.load(target)["step"] == 1
    assert [path.name for path in target.parent.iterdir()] == ["last.ckpt"]


DOUBLE_RESOLUTION_AT_STEP_3 = [{"step": 0, "size": 16, "schedule": [[1, 1], [2, 2], [4, 4]]},
                               {"step": 3, "size": 32, "stride": 4}]


@pytest.mark.parametrize(
    "num_workers, phases",
    [(0, DOUBLE_RESOLUTION_AT_STEP_3), (2, [])],
    ids=["main_process_with_a_switch_in_the_epoch", "two_persistent_workers"],
)
def test_run_resumed_mid_epoch_logs_the_losses_of_an_uninterrupted_run(
    assets: Path, tmp_path: Path, num_workers: int, phases: list
) -> None:
    """Checkpoint at step 3 with 2 batches per epoch: the resumed run must replay data epoch 2 without its first
    batch (Lightning goes on at batch_idx 1 and ends that epoch after one more batch), then read epoch 3. With the
    switch at step 3, the skipped batch (batch 2 of the run) is at 16 px and the next ones at 32 px, by their index
    and not by when they were read ahead (the loader reads one batch ahead of the step): the replay must keep that."""
    train = load_train_module()
    sections = {
        "data": {"num_workers": num_workers, "persistent_workers": num_workers > 0},
        "trainer": {"max_steps": 5, "checkpoint_every_n_steps": 3},
        "resolution_phases": phases,
    }
    whole = write_config(tmp_path / "whole.yaml", tiny_run(assets, tmp_path / "whole", **sections))
    assert train.main([str(whole), "stage.schedule.total_steps=5"]) == 0
    split = write_config(tmp_path / "split.yaml", tiny_run(assets, tmp_path / "split", **sections))
    assert train.main([str(split), "stage.schedule.total_steps=5", "trainer.max_steps=3"]) == 0
    interrupted = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    position = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (position["epoch"], position["consumed"]) == (2, 1)
    assert position["resolutions"][0][:2] == [1, 16]
    assert train.main([str(split), "stage.schedule.total_steps=5", "--resume", "last"]) == 0

    expected = logged(tmp_path / "whole", "train/loss")
    resumed = logged(tmp_path / "split", "train/loss")
    assert sorted(expected) == sorted(resumed) == [0, 1, 2, 3, 4]
    assert resumed == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_step_counting_of_the_resolution_plan_agrees_with_the_precompute_batch_count() -> None:
    """``first_batch_of_step`` (where a resolution phase starts) and ``train.remaining_micro_batches`` (how many
    batches DPO reference log-probs are computed ahead for) count Lightning's steps the same way."""
    from datamodules.resume import first_batch_of_step

    remaining = load_train_module().remaining_micro_batches
    for batches_per_epoch, accumulate in [(3, 2), (4, 2), (5, 3), (7, 1), (2, 4)]:
        for start in range(6):
            for stop in range(start, 12):
                first = first_batch_of_step(start, accumulate, batches_per_epoch)
                expected = first_batch_of_step(stop, accumulate, batches_per_epoch) - first
                assert remaining(start, stop, first % batches_per_epoch, batches_per_epoch, accumulate) == expected
