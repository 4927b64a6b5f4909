"""Two-process CPU DDP (gloo) through train.py: a few steps, every rank the same number of batches, one export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_cli import ROOT, logged, tiny_run, write_config, write_tiny_assets


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_checkpoints_and_exports(tmp_path: Path) -> None:
    assets = write_tiny_assets(tmp_path / "assets")
    output_dir = tmp_path / "ddp"
    run = tiny_run(assets, output_dir, trainer={"devices": 2, "strategy": {"name": "ddp",
                                                                           "process_group_backend": "gloo"}})
    config = write_config(tmp_path / "ddp.yaml", run)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(logged(output_dir, "train/loss")) == [0, 1, 2, 3]
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert (output_dir / "export" / "config.json").is_file()
    assert "world_size=2" in result.stderr or "Initializing distributed: GLOBAL_RANK: 1" in result.stderr
