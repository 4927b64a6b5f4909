"""Helpers the benchmark scripts share: moving a batch to the device and waiting for the device before a clock
reads (``python benchmarks/<script>.py`` puts this folder on the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor moved to ``device``; other values as they are."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA work on ``device``; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(run: Callable[[], object], count: int, device: torch.device) -> list[float]:
    """Wall seconds of each of ``count`` calls of ``run``, the device's queued work included."""
    seconds = []
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds
