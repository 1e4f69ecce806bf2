"""int8 weights with a scale per row and per column: how a release stores its big matrices (bundle format
"int8-rowcol+fp16").

A 2-D floating tensor W (rows, cols) with at least MIN_ELEMENTS elements (with a full ED vocabulary: the word
embedding and the generator's output projection, V x 300 each) is stored symmetric, with one float32 factor per
column and one per row:

    c_j = max_i |W_ij| / mean_j' max_i |W_ij'|   stored as the float32 tensor `<name>.__colscale__`, shape (cols,)
    s_i = max_j |W_ij / c_j| / 127              stored as the float32 tensor `<name>.__scale__`, shape (rows,)
    Q_ij = round(W_ij / (s_i c_j))              stored as `<name>`, int8 in [-127, 127]
    W'_ij = Q_ij * s_i * c_j                    what loading gives back (float32): |W'_ij - W_ij| <= s_i c_j / 2

The column factors matter: the columns of a trained ED model's embedding and output projection differ in range
by up to 4x and 12x, and dividing them out first cuts the squared error of per-row int8 by 3x and 11x there
(the released ESCM's matrices; BENCHMARKS.md). Every other floating tensor is stored as float16, every other
tensor (integer buffers) as it is; all of them in the one safetensors file. `dequantize_state` checks a stored
state against the model's own before anything is loaded: a missing, extra or misshapen tensor, a scale that is
missing, orphaned, not float32, of the wrong shape, negative (a column factor: not positive) or not finite, is a
ValueError naming the tensor.
"""

from __future__ import annotations

import torch

FORMAT = "int8-rowcol+fp16"
SCALE_SUFFIX = ".__scale__"       # one per row
COL_SUFFIX = ".__colscale__"    # one per column
SUFFIXES = (SCALE_SUFFIX, COL_SUFFIX)
MIN_ELEMENTS = 1_000_000  # the V x d matrices of a full vocabulary; attention and feed-forward weights stay fp16
QMAX = 127


def quantizes(tensor: torch.Tensor, min_elements: int) -> bool:
    """Whether `tensor` is stored as int8: 2-D, floating and at least `min_elements` elements."""
    return tensor.is_floating_point() and tensor.dim() == 2 and tensor.numel() >= min_elements


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row, float32 factor per column) of a 2-D tensor (the module docstring's
    equations); an all-zero column gets factor 1, an all-zero row scale 0 and zeros."""
    w = weight.detach().float()
    col = w.abs().amax(dim=0)  # (cols,)
    col = torch.where(col > 0, col / col[col > 0].mean(), torch.ones_like(col)) if bool((col > 0).any()) \
        else torch.ones_like(col)
    wn = w / col[None, :]
    scale = wn.abs().amax(dim=1) / QMAX  # (rows,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wn / safe[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous(), col.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """float32 (rows, cols) from int8 values, their per-row scale and per-column factor."""
    return q.float() * scale[:, None] * col[None, :]


def quantize_state(state: dict[str, torch.Tensor], min_elements: int = MIN_ELEMENTS) -> dict[str, torch.Tensor]:
    """The tensors to write: big 2-D floating ones as int8 + `<name>.__scale__` + `<name>.__colscale__`, other
    floating ones float16."""
    stored = {}
    for name, tensor in state.items():
        if quantizes(tensor, min_elements):
            stored[name], stored[name + SCALE_SUFFIX], stored[name + COL_SUFFIX] = quantize_rows(tensor)
        elif tensor.is_floating_point():
            stored[name] = tensor.detach().half().contiguous()
        else:
            stored[name] = tensor.detach().contiguous()
    return stored


def dequantize_state(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state (dtypes of `expected`, the model's own state) from stored tensors, every one checked;
    ValueError naming the first tensor that is wrong."""
    factors = {k: v for k, v in stored.items() if k.endswith(SUFFIXES)}
    tensors = {k: v for k, v in stored.items() if not k.endswith(SUFFIXES)}
    _check_names(tensors, factors, expected)
    return {name: _restore(name, tensors[name], factors, want) for name, want in expected.items()}


def _check_names(tensors: dict, factors: dict, expected: dict) -> None:
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError("the stored tensors differ from the model's: "
                         + "; ".join(p for p in (missing and f"missing {', '.join(missing)}",
                                                 extra and f"unexpected {', '.join(extra)}") if p))
    orphans = sorted(key for key in factors
                     if tensors.get(key.rsplit(".__", 1)[0], torch.empty(0)).dtype != torch.int8)
    if orphans:
        raise ValueError(f"scale tensor(s) {', '.join(orphans)} belong to no int8 tensor")


def _restore(name: str, tensor: torch.Tensor, factors: dict[str, torch.Tensor], want: torch.Tensor) -> torch.Tensor:
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
    rows, cols = tensor.shape
    scale = _factor(name, SCALE_SUFFIX, factors, rows, "row", lambda v: v >= 0)
    col = _factor(name, COL_SUFFIX, factors, cols, "column", lambda v: v > 0)
    return dequantize_rows(tensor, scale, col).to(want.dtype)


def _factor(name: str, suffix: str, factors: dict, size: int, per: str, valid) -> torch.Tensor:
    """The checked float32 scale tensor `name + suffix`: one per `per`, finite, and `valid` everywhere."""
    key = name + suffix
    factor = factors.get(key)
    if factor is None:
        raise ValueError(f"tensor {name} is int8 but its scale tensor {key} is missing")
    if factor.dtype != torch.float32 or factor.shape != (size,):
        raise ValueError(f"scale tensor {key} is {factor.dtype} of shape {tuple(factor.shape)}: "
                         f"expected torch.float32 of shape ({size},), one per {per}")
    if not bool(torch.isfinite(factor).all()) or not bool(valid(factor).all()):
        raise ValueError(f"scale tensor {key} is corrupt: it holds "
                         + ("negative" if per == "row" else "zero or negative") + " or non-finite values")
    return factor
