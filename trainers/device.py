"""Device policy: which device a run uses and when bf16 autocast applies (training, evaluation and serving)."""

from __future__ import annotations

import functools

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; any other name is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls are native (not emulated) on this device type: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX (asked through torch, which reads the CPUID flags with the cpuinfo library: any OS)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(bf16: bool, device: torch.device, min_cpu_batch: int = 0, batch: int = 0):
    """bf16 autocast when `bf16` is on and native on the device (`native_bf16`), on a CPU only for batches of at
    least `min_cpu_batch` rows (inference: small CPU batches run faster in fp32); a no-op context elsewhere."""
    on = bf16 and native_bf16(device.type) and (device.type != "cpu" or batch >= min_cpu_batch)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)
