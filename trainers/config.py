"""Typed, validated configuration: the run configs, loadable from YAML and overridable from the CLI.

The run configs live here, one import for all of them: `DataConfig` (where the data comes from and how it is
preprocessed), `DecodeConfig` (decoding settings), `InferenceConfig` (what a trained model is used with) and
`TrainConfig` (everything one training run needs; its `recipe` fills in what a run does not set,
trainers.recipes). Model configs stay beside their models (trainers.models).

A bad value fails with `ConfigError` naming the field (`data.min_freq: Input should be ...`).
Overrides are `dotted.key=value` strings; values are parsed as YAML scalars (`3`, `true`, `1e-4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.data import annotate as ann
from trainers.data.sources import EMBEDDED_SAMPLE
from trainers.metrics import GENERATION_METRICS, METRIC_MODES, SAMPLED
from trainers.recipes import RECIPE_NAMES, SCHEDULES, recipe_values

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a": {"b": 1}, "c": "x"}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({e})") from e
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated with `extra`; nested dicts merge key by key (`extra` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                **values: Any) -> T:
    """Build `cls` from a YAML file, then keyword values, then CLI overrides (later wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    data = deep_merge(data, {k: v for k, v in values.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path) if path else None)) from None


def format_validation_error(e: ValidationError, source: str | None = None) -> str:
    lines = [f"invalid configuration{f' in {source}' if source else ''}:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {field}: {err['msg']}{got}")
    return "\n".join(lines)


def with_recipe(data: dict[str, Any], default_model: str) -> dict[str, Any]:
    """Raw TrainConfig fields `data` over the values of its recipe (`data["recipe"]`, default "platform"):
    what `data` sets wins, dicts (`model_overrides`, `decode`) merge key by key. An unknown recipe or model
    is left for validation to report."""
    name, model = data.get("recipe", "platform"), data.get("model", default_model)
    if name not in RECIPE_NAMES or model not in SCHEDULES:
        return data
    return deep_merge(recipe_values(name, model), data)


# ------------------------------------------------------------------------------------------------
# The run configs


class DataConfig(StrictModel):
    """Where the data comes from and how it is preprocessed (all fields hashed except the runtime ones)."""

    source: str = Field("sample", description="'sample' (embedded), a dir/file/.tar.gz, or s3://bucket/prefix")
    cache_dir: str = Field("~/.cache/edp/prepared", description="where prepared entries live")
    skip_invalid: bool = Field(False, description="skip malformed records (counted) instead of failing")
    splits: list[str] = Field(default_factory=lambda: ["train", "valid"], min_length=1)
    min_freq: int = Field(1, ge=1, description="words seen fewer times in train map to [UNK]")
    max_vocab: int | None = Field(None, ge=64)
    spacy_model: str = Field(ann.DEFAULT_PIPELINE, description="spaCy package name or model path")
    contractions: Literal["keep", "expand"] = Field(
        "keep", description="'expand': rewrite contractions to full words before spaCy, as the authors' "
                            "preprocessing (\"don't\" -> \"do not\")")
    vectors: str = Field("spacy", description="'spacy' (en_core_web_md vectors), 'none', or a GloVe .txt path")
    knowledge: Literal["none", "precomputed", "comet"] = "none"
    knowledge_path: str | None = Field(None, description="jsonl (precomputed) or checkpoint dir/s3:// (comet)")
    s3_endpoint_url: str | None = None
    shared_cache: str | None = Field(None, description="s3:// prefix where entries are published and fetched, so "
                                     "the nodes of a cluster share one preparation (runtime only, not hashed)")
    n_process: int = Field(1, ge=1, le=64, description="spaCy worker processes (runtime only, not hashed)")
    parse_batch_size: int = Field(256, ge=1, description="spaCy nlp.pipe batch size (not hashed)")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in ("train", "valid", "test")]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; choose from train, valid, test")
        if "train" not in v:
            raise ValueError("'train' is required: the vocabulary is built from it")
        return v

    def resolved_source(self) -> str:
        return str(EMBEDDED_SAMPLE) if self.source == "sample" else self.source

    def hashed_settings(self) -> dict:
        runtime = {"cache_dir", "n_process", "parse_batch_size", "s3_endpoint_url", "shared_cache", "source"}
        return {k: v for k, v in self.model_dump().items() if k not in runtime}


STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class DecodeConfig:
    """How responses are decoded (trainers.decoding); a run keeps its fields in `InferenceConfig.decode`."""

    strategy: str = "greedy"       # the papers' evaluation uses greedy
    max_len: int = 30              # the platform's cap; the paper recipe: 51
    beam_size: int = 5
    length_penalty: float = 1.0    # GNMT alpha; 0 = rank by raw log-probability
    top_k: int = 0                 # 0 = no top-k filter
    top_p: float = 1.0             # 1.0 = no nucleus filter
    temperature: float = 1.0
    kv_cache: bool = True          # incremental decoding (same tokens); False recomputes the prefix each step

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.kv_cache, bool):
            raise ValueError(f"kv_cache must be true or false, got {self.kv_cache!r}")


class InferenceConfig(StrictModel):
    """The run settings a trained model is used with: architecture, preprocessing, lengths, precision, decoding."""

    model: Literal["transformer", "escm", "iamm"] = "escm"
    data: DataConfig = Field(default_factory=DataConfig)
    max_context: int = Field(400, ge=8)
    max_target: int = Field(60, ge=4)
    bf16: bool = Field(True, description="bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)")
    decode: dict[str, Any] = Field(default_factory=dict, description="DecodeConfig fields")
    unseen_vectors: bool = Field(
        False, description="evaluation and serving: a context word outside the vocabulary that has a vector in "
                           "data.vectors is embedded with it (x vector_scale) instead of [UNK] and can still be copied "
                           "(trainers/data/unseen.py); never used in training; the paper recipe's. Absent from a saved "
                           "run's config: off")
    vector_scale: float | None = Field(
        None, gt=0, description="the factor training applied to the pretrained vectors (1 for embedding_init "
                                "'vectors'); recorded by the trainer, which replaces any value given. None: not "
                                "recorded")

    @model_validator(mode="after")
    def _check_decode(self) -> InferenceConfig:
        DecodeConfig(**self.decode)  # fail early on bad decoding settings
        return self

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(**self.decode)

    @classmethod
    def of_run(cls, config: dict) -> InferenceConfig:
        """The inference part of a checkpoint's run config (a dumped `TrainConfig`, `as_recorded`)."""
        return cls.model_validate({k: v for k, v in as_recorded(config).items() if k in cls.model_fields})


def as_recorded(config: dict) -> dict:
    """A saved run config (a dumped TrainConfig) with what it means for the fields added after it was saved:
    `unseen_vectors` absent is off (never a recipe's value), `vector_scale` absent is 1 where the run used the
    vectors at their own scale (`embedding_init: vectors`) and unknown otherwise."""
    out = {"unseen_vectors": False, **config}
    if out.get("vector_scale") is None and out.get("embedding_init") == "vectors" and out.get("use_vectors", True) \
            and (out.get("data") or {}).get("vectors", "spacy") != "none":
        out["vector_scale"] = 1.0
    return out


class TrainConfig(InferenceConfig):
    """Everything one training run needs (the inherited `InferenceConfig` fields too). `recipe` fills in the
    fields a run does not set (trainers.recipes); the defaults are the "platform" recipe."""

    recipe: Literal[RECIPE_NAMES] = Field("platform", description="named bundle of settings: platform | paper")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields, e.g. no_vr")
    out_dir: str = "runs/train"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    max_steps: int = Field(13500, ge=1, description="ESCM converged after 13,500 steps (paper 4.2)")
    warmup: int = Field(8000, ge=1, description="Noam warm-up steps")
    lr_factor: float = Field(1.0, gt=0, description="Noam schedule factor")
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = Field(1e-9, gt=0)
    grad_clip: float = Field(2.0, ge=0, description="max global grad norm; 0 disables")
    embedding_init: Literal["rescaled", "vectors"] = Field(
        "rescaled", description="word vectors rescaled to the model's init norm, or at their own scale with "
                                "words without a vector ~ N(0, 0.01^2) (the authors')")
    eval_every: int = Field(500, ge=1)
    eval_from: int = Field(0, ge=0, description="no evaluation before this step (the last step always evaluates); "
                                                  "before it, every eval_every steps saves a checkpoint only")
    selection: Literal["early_stop", "reference"] = Field(
        "early_stop", description="best checkpoint: by early_stop_metric with patience, or the authors' rule")
    select_ppl: float = Field(43.0, gt=0, description="reference rule: also keep a checkpoint with PPL below this")
    select_acc: float = Field(0.385, ge=0, description="... and emotion accuracy above this")
    log_every: int = Field(50, ge=1)
    eval_generate: int = Field(256, ge=0, description="valid examples decoded per evaluation, their Dist/BLEU "
                               "logged as *_sampled (0 = all: the papers' whole-split figures); the final "
                               "evaluation always decodes the whole split")
    early_stop_metric: str = "valid_ppl"
    patience: int = Field(10, ge=1, description="evaluations without improvement before stopping")
    keep_checkpoints: int = Field(2, ge=1)
    bucket_width: int = Field(32, ge=8)
    batching: Literal["bucketed", "random"] = Field(
        "bucketed", description="epoch plan: batches within a length bucket, target lengths sorted in pools "
                                "(bucketed), or random batches of the whole split as the authors' (random)")
    compile: bool = Field(False, description="torch.compile the model (CUDA)")
    use_vectors: bool = Field(True, description="initialise word embeddings from the prepared vectors")
    num_samples: int = Field(100, ge=0, description="sample generations written at the end")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        return with_recipe(data, cls.model_fields["model"].default) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_early_stop(self) -> TrainConfig:
        if self.early_stop_metric not in METRIC_MODES:
            raise ValueError(f"early_stop_metric must be one of {sorted(METRIC_MODES)}")
        metric, is_sampled = self.early_stop_metric, self.early_stop_metric.endswith(SAMPLED)
        if metric.removesuffix(SAMPLED) in GENERATION_METRICS and is_sampled != (self.eval_generate > 0):
            raise ValueError(f"early_stop_metric {metric} needs eval_generate "
                             + ("> 0 (a sample of valid)" if is_sampled else "= 0 (the whole valid split)"))
        return self
