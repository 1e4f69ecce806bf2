"""Model table: name -> (config class, model class, flavours).

    cfg = config_for("escm", flavour="tiny", no_vr=True)
    model = build_model("escm", vocab_size=len(vocab), emotion_word_ids=vocab.emotion_ids(), no_vr=True)

Every model takes (config, vocab_size, emotion_word_ids) and implements the interface documented on
`trainers.models.interface.PointerGeneratorSeq2Seq` (forward / encode / decode_step). `flavour` is a
pseudo-override: "paper" (the defaults) or "tiny" (d=32, for CPU tests); explicit overrides win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from trainers.models.escm import ESCM, ESCMConfig
from trainers.models.iamm import IAMM, IAMMConfig
from trainers.models.layers import ModelConfig, xavier_init_
from trainers.models.transformer import TransformerConfig, TransformerSeq2Seq

_TINY = {"emb_dim": 32, "d_model": 32, "attn_depth": 16, "ffn_dim": 32, "max_len": 256}


@dataclass(frozen=True)
class ModelSpec:
    config_cls: type[ModelConfig]
    model_cls: type[nn.Module]
    flavours: dict[str, dict] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "transformer": ModelSpec(TransformerConfig, TransformerSeq2Seq, {"paper": {}, "tiny": dict(_TINY)}),
    "escm": ModelSpec(ESCMConfig, ESCM, {"paper": {}, "tiny": {**_TINY, "d_pr": 8}}),
    # the tiny IAMM keeps max_len 1024: its memory holds up to 2 * 20 * (3M - 2) entries for M turns
    "iamm": ModelSpec(IAMMConfig, IAMM, {"paper": {}, "tiny": {**_TINY, "d_h": 8, "max_len": 1024}}),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def config_for(name: str, **overrides) -> ModelConfig:
    """Resolved config of model `name`: flavour defaults, then overrides. ValueError names a bad key."""
    spec = _spec(name)
    flavour = overrides.pop("flavour", "paper")
    if flavour not in spec.flavours:
        raise ValueError(f"unknown flavour {flavour!r} for model {name!r}; known: {sorted(spec.flavours)}")
    unknown = sorted(set(overrides) - spec.config_cls.field_names())
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model {name!r}; "
                         f"valid: {sorted(spec.config_cls.field_names())}")
    return spec.config_cls(**{**spec.flavours[flavour], **overrides})


def build_model(name: str, vocab_size: int, emotion_word_ids: list[int], **overrides) -> nn.Module:
    """Build model `name` for a vocabulary of `vocab_size` ids whose emotion words are `emotion_word_ids`."""
    cfg = config_for(name, **overrides)
    model = _spec(name).model_cls(cfg, vocab_size, emotion_word_ids)
    if cfg.xavier_init:
        xavier_init_(model)
    return model


__all__ = ["MODELS", "ModelSpec", "build_model", "config_for"]
