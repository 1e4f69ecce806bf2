"""int8 weights with one scale per row: how a release stores its big matrices (bundle format "int8-rows+fp16").

A 2-D floating tensor W (rows, cols) with at least MIN_ELEMENTS elements (with a full ED vocabulary: the word
embedding and the generator's output projection, V x 300 each) is stored symmetric, one float32 scale per row:

    s_i = max_j |W_ij| / 127          stored as the float32 tensor `<name>.__scale__`, shape (rows,)
    Q_ij = round(W_ij / s_i)          stored as `<name>`, int8 in [-127, 127]
    W'_ij = Q_ij * s_i                what loading gives back (float32): |W'_ij - W_ij| <= s_i / 2

Every other floating tensor is stored as float16, every other tensor (integer buffers) as it is; all of them in
the one safetensors file. `dequantize_state` checks a stored state against the model's own before anything is
loaded: a missing, extra or misshapen tensor, a scale that is missing, orphaned, not float32, of the wrong shape,
negative or not finite, is a ValueError naming the tensor.
"""

from __future__ import annotations

import torch

FORMAT = "int8-rows+fp16"
SCALE_SUFFIX = ".__scale__"
MIN_ELEMENTS = 1_000_000  # the V x d matrices of a full vocabulary; attention and feed-forward weights stay fp16
QMAX = 127


def quantizes(tensor: torch.Tensor, min_elements: int) -> bool:
    """Whether `tensor` is stored as int8: 2-D, floating and at least `min_elements` elements."""
    return tensor.is_floating_point() and tensor.dim() == 2 and tensor.numel() >= min_elements


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of a 2-D tensor; an all-zero row gets scale 0 and zeros."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX  # (rows,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (rows, cols) from int8 values and their per-row scale."""
    return q.float() * scale[:, None]


def quantize_state(state: dict[str, torch.Tensor], min_elements: int = MIN_ELEMENTS) -> dict[str, torch.Tensor]:
    """The tensors to write: big 2-D floating ones as int8 + `<name>.__scale__`, other floating ones float16."""
    stored = {}
    for name, tensor in state.items():
        if quantizes(tensor, min_elements):
            stored[name], stored[name + SCALE_SUFFIX] = quantize_rows(tensor)
        elif tensor.is_floating_point():
            stored[name] = tensor.detach().half().contiguous()
        else:
            stored[name] = tensor.detach().contiguous()
    return stored


def dequantize_state(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state (dtypes of `expected`, the model's own state) from stored tensors, every one checked;
    ValueError naming the first tensor that is wrong."""
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in stored.items() if k.endswith(SCALE_SUFFIX)}
    tensors = {k: v for k, v in stored.items() if not k.endswith(SCALE_SUFFIX)}
    _check_names(tensors, scales, expected)
    return {name: _restore(name, tensors[name], scales.get(name), want) for name, want in expected.items()}


def _check_names(tensors: dict, scales: dict, expected: dict) -> None:
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError("the stored tensors differ from the model's: "
                         + "; ".join(p for p in (missing and f"missing {', '.join(missing)}",
                                                 extra and f"unexpected {', '.join(extra)}") if p))
    orphans = sorted(name + SCALE_SUFFIX for name in scales if tensors.get(name, torch.empty(0)).dtype != torch.int8)
    if orphans:
        raise ValueError(f"scale tensor(s) {', '.join(orphans)} belong to no int8 tensor")


def _restore(name: str, tensor: torch.Tensor, scale: torch.Tensor | None, want: torch.Tensor) -> torch.Tensor:
    """One stored tensor back in `want`'s dtype, after checking its shape, dtype and scale."""
    if tensor.shape != want.shape:
        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the model's is {tuple(want.shape)}")
    if not want.is_floating_point():
        if tensor.dtype != want.dtype:
            raise ValueError(f"tensor {name} is stored as {tensor.dtype}, the model's is {want.dtype}")
        return tensor
    if tensor.dtype == torch.float16:
        return tensor.to(want.dtype)
    if tensor.dtype != torch.int8 or tensor.dim() != 2:
        raise ValueError(f"tensor {name} is stored as {tensor.dim()}-D {tensor.dtype}: {FORMAT} stores a floating "
                         "tensor as float16, or 2-D int8 with a scale")
    if scale is None:
        raise ValueError(f"tensor {name} is int8 but its scale tensor {name}{SCALE_SUFFIX} is missing")
    if scale.dtype != torch.float32 or scale.shape != (tensor.shape[0],):
        raise ValueError(f"scale tensor {name}{SCALE_SUFFIX} is {scale.dtype} of shape {tuple(scale.shape)}: "
                         f"expected torch.float32 of shape ({tensor.shape[0]},), one per row")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError(f"scale tensor {name}{SCALE_SUFFIX} is corrupt: it holds negative or non-finite values")
    return dequantize_rows(tensor, scale).to(want.dtype)
