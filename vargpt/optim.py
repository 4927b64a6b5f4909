"""Muon for a model's hidden matrices with AdamW for every other parameter, as one ``torch.optim.Optimizer``.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") replaces the update of a weight
matrix by the orthogonalised momentum of its gradient: a Newton-Schulz iteration maps the (Nesterov) momentum ``M`` to
about ``U V^T`` of its singular value decomposition, so every direction of the update moves at the same rate. It is
meant for the matrices inside a network; embeddings, output heads and 1-D parameters (biases, norms) keep AdamW.

``MuonAdamW`` takes parameter groups flagged ``use_muon``: one optimizer, so one learning-rate schedule, one
``state_dict`` and Lightning's single-optimizer loop serve both. Each Muon update is scaled by
``0.2 * sqrt(max(rows, cols))`` (Liu et al.'s rule, torch's ``adjust_lr_fn="match_rms_adamw"``), so its
root-mean-square matches a typical AdamW update and the same learning rate serves both kinds of group. The updates
equal ``torch.optim.Muon`` (with that rule) and ``torch.optim.AdamW`` on their own groups (``tests/test_optim.py``; the
AdamW groups call torch's functional AdamW); torch's ``Muon`` alone cannot hold the non-matrix parameters.

Under data parallelism every process holds the same parameters and, after the gradient all-reduce, the same
gradients, so each would orthogonalise the same matrices. With ``shard_orthogonalization`` (the default) and a
process group of more than one process, each process orthogonalises its share of the matrices (balanced by their
Newton-Schulz cost) and one all-gather hands every process all the updates: the same result, the work divided by the
number of processes (as Liu et al.'s distributed Muon and the modded-nanogpt speedruns do). It needs what DDP gives:
the same parameters and gradients in every process; model-parallel or sharded runs must switch it off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

# Newton-Schulz quintic coefficients tuned for the slope at zero (Jordan et al.; torch.optim.Muon's defaults).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """About ``U V^T`` for ``matrix = U S V^T``: ``steps`` quintic Newton-Schulz iterations in bfloat16 after scaling
    the Frobenius norm to 1 (so the spectral norm is at most 1). The singular values land near 1, not on it, which
    Muon's authors found does not matter for training."""
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    x = matrix.to(dtype=torch.bfloat16, copy=True)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def orthogonalization_cost(shape: torch.Size) -> int:
    """Multiply-adds of one Newton-Schulz iteration on a ``shape`` matrix: with ``m <= n`` its sides, ``2 m^2 n``
    for the Gram matrix and the product with ``x``, ``m^3`` for the Gram matrix squared."""
    small, large = sorted(shape[:2])
    return 2 * small * small * large + small ** 3


def shard_owners(shapes: list[torch.Size], world_size: int) -> list[int]:
    """The process that orthogonalises each matrix: largest cost first, each to the least loaded process (ties to the
    lowest rank), so the shares are balanced and every process computes the same assignment."""
    loads = [0] * world_size
    owners = [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: (-orthogonalization_cost(shapes[i]), i)):
        owner = min(range(world_size), key=lambda rank: (loads[rank], rank))
        owners[index] = owner
        loads[owner] += orthogonalization_cost(shapes[index])
    return owners


def muon_lr_scale(shape: torch.Size) -> float:
    """Liu et al.'s factor on the learning rate of a Muon update: its RMS then matches a typical AdamW update's."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups with ``use_muon=True`` (2-D parameters only), AdamW on the others.

    Group options (defaults from the constructor): ``lr``, ``weight_decay`` (decoupled, both kinds), ``betas`` and
    ``eps`` (AdamW), ``momentum``, ``nesterov`` and ``ns_steps`` (Muon). ``fused`` chooses torch's fused AdamW
    kernel for the AdamW groups (None: torch's choice). ``shard_orthogonalization``: see the module's docstring.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        fused: bool | None = None,
        shard_orthogonalization: bool = True,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonAdamW: momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"MuonAdamW: ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)
        self.fused = fused
        self.shard_orthogonalization = shard_orthogonalization
        self._plan_key: tuple | None = None
        self._plan: tuple[list[int], list[int], int] = ([], [], 0)
        for index, group in enumerate(self.param_groups):
            if group["use_muon"]:
                shapes = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if shapes:
                    raise ValueError(f"MuonAdamW: group {index} uses Muon but holds non-matrix parameters {shapes[:3]}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([group for group in self.param_groups if group["use_muon"]])
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        return loss

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        """One Muon update of every Muon group's parameters that have a gradient: momentum, then the orthogonalised
        direction, then decoupled weight decay and the step. Each direction is made only where it is orthogonalised
        (here, or by its owner when shared out), and the unshared path does one matrix at a time."""
        entries = []
        for group in groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["momentum_buffer"].lerp_(param.grad, 1 - group["momentum"])
                entries.append((param, group))
        world_size = (dist.get_world_size() if self.shard_orthogonalization and dist.is_available()
                      and dist.is_initialized() else 1)
        if world_size == 1 or not entries:
            for param, group in entries:
                self._apply(param, group, orthogonalize(self._direction(param, group), group["ns_steps"]))
            return
        # each process its share; one all-gather of the bf16 updates (2 bytes per parameter) hands out the rest
        rank = dist.get_rank()
        owners, starts, length = self._shard_plan(tuple(param.shape for param, _ in entries), world_size)
        local = torch.zeros(length, dtype=torch.bfloat16, device=entries[0][0].device)
        for (param, group), owner, start in zip(entries, owners, starts):
            if owner == rank:
                update = orthogonalize(self._direction(param, group), group["ns_steps"])
                local[start:start + param.numel()] = update.reshape(-1)
        shares = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(shares, local)
        for (param, group), owner, start in zip(entries, owners, starts):
            self._apply(param, group, shares[owner][start:start + param.numel()].view(param.shape))

    def _shard_plan(self, shapes: tuple[torch.Size, ...], world_size: int) -> tuple[list[int], list[int], int]:
        """Each matrix's owning process, its offset in that process's share of the all-gather and the share length;
        the same every step while the matrices with gradients are, so it is computed once for them."""
        key = (shapes, world_size)
        if self._plan_key != key:
            owners = shard_owners(list(shapes), world_size)
            filled = [0] * world_size
            starts = []
            for shape, owner in zip(shapes, owners):
                starts.append(filled[owner])
                filled[owner] += math.prod(shape)
            self._plan_key, self._plan = key, (owners, starts, max(filled))
        return self._plan

    def _direction(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The momentum to orthogonalise: Nesterov's look-ahead ``lerp(grad, buffer, momentum)``, or the buffer."""
        buffer = self.state[param]["momentum_buffer"]
        return param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    @staticmethod
    def _apply(param: torch.Tensor, group: dict[str, Any], update: torch.Tensor) -> None:
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"] * muon_lr_scale(param.shape))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """torch's own AdamW update (its functional form, multi-tensor where torch picks it) on the group's
        parameters; the state has ``torch.optim.AdamW``'s keys."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                # as torch's AdamW: the step on the parameter's device for the fused kernel, on the CPU otherwise
                state["step"] = (torch.zeros((), dtype=torch.float32, device=param.device) if self.fused
                                 else torch.tensor(0.0))
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                  fused=self.fused)
