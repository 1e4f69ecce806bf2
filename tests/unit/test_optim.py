"""Adam with the Noam schedule (trainers.optim)."""

from __future__ import annotations

import pytest
import torch

from trainers.optim import build_optimizer, noam_lambda, noam_rate


def test_noam_schedule_values():
    d, w = 300, 8000
    assert noam_rate(1, d, w) == pytest.approx(d ** -0.5 * 1 * w ** -1.5)
    assert noam_rate(100, d, w) == pytest.approx(d ** -0.5 * 100 * w ** -1.5)
    assert noam_rate(8000, d, w) == pytest.approx(d ** -0.5 * 8000 ** -0.5)
    assert noam_rate(32000, d, w, factor=2.0) == pytest.approx(2 * d ** -0.5 * 32000 ** -0.5)
    assert noam_rate(8000, d, w) > noam_rate(7000, d, w) and noam_rate(8000, d, w) > noam_rate(9000, d, w)
    with pytest.raises(ValueError):
        noam_rate(0, d, w)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: noam_lambda(s, d, w))
    for k in range(1, 6):  # the k-th update runs at rate(k)
        assert opt.param_groups[0]["lr"] == pytest.approx(noam_rate(k, d, w))
        opt.step()
        sched.step()


def test_build_optimizer_runs_the_noam_schedule_with_the_given_adam_settings():
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, torch.device("cpu"), betas=(0.9, 0.98), eps=1e-9, d_model=300,
                                 warmup=10, factor=2.0)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9 and group["fused"]
    for k in range(1, 4):
        assert group["lr"] == pytest.approx(noam_rate(k, 300, 10, factor=2.0))
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
