"""Device policy (trainers.device): the device a name resolves to and when bf16 autocast applies."""

from __future__ import annotations

import torch

from trainers import device as dev


def test_resolve_device():
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")


def test_autocast_is_on_only_when_enabled_native_and_the_cpu_batch_is_big_enough(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "native_bf16", lambda device_type: True)
    assert dev.autocast(True, cpu)._enabled
    assert not dev.autocast(False, cpu)._enabled
    assert not dev.autocast(True, cpu, min_cpu_batch=8, batch=4)._enabled
    assert dev.autocast(True, cpu, min_cpu_batch=8, batch=8)._enabled
    monkeypatch.setattr(dev, "native_bf16", lambda device_type: False)
    assert not dev.autocast(True, cpu)._enabled


def test_native_bf16_reads_the_cpu_flags_and_knows_no_other_device():
    assert dev.native_bf16("mps") is False
    flags = open("/proc/cpuinfo").read().split()
    assert dev.native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
