"""The papers' optimiser: Adam with the Noam learning-rate schedule (Vaswani et al. 2017, eq. 3)."""

from __future__ import annotations

import functools

import torch


def noam_rate(step: int, d_model: int, warmup: int = 8000, factor: float = 1.0) -> float:
    """Noam rate at optimizer update `step` >= 1: factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
    if step < 1:
        raise ValueError(f"noam step must be >= 1, got {step}")
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def noam_lambda(step: int, d_model: int, warmup: int = 8000, factor: float = 1.0) -> float:
    """Multiplier for torch.optim.lr_scheduler.LambdaLR (base lr 1.0).

    LambdaLR calls it with the number of scheduler steps done so far (0 for the first update), so this is
    noam_rate(step + 1): the k-th optimizer update (k >= 1) runs at exactly the authors' NoamOpt rate(k).
    Use e.g. LambdaLR(opt, functools.partial(noam_lambda, d_model=300)).
    """
    return noam_rate(step + 1, d_model, warmup, factor)


def build_optimizer(model: torch.nn.Module, device: torch.device, *, betas: tuple[float, float], eps: float,
                    d_model: int, warmup: int, factor: float):
    """(Adam, LambdaLR with the Noam schedule); fused Adam kernels on CUDA and the CPU."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=betas, eps=eps,
                                 fused=device.type in ("cuda", "cpu"))
    schedule = functools.partial(noam_lambda, d_model=d_model, warmup=warmup, factor=factor)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
