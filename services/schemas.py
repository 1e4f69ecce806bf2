"""Request and response bodies of the HTTP endpoint (pydantic; FastAPI serves them in the OpenAPI schema).

Limits come from the Serve config (`max_turns`, `max_turn_chars`) through the validation context:

    RespondRequest.model_validate(obj, context={"max_turns": 8, "max_turn_chars": 500})

Without a context the defaults below apply. Validation is strict: a number where text belongs is an
error, not coerced; unknown fields are errors (a misspelt `situaton` must not be silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from services.safety import DEFAULT_MESSAGE, SCREEN

DEFAULT_MAX_TURNS = 16
DEFAULT_MAX_TURN_CHARS = 1000


def _limit(info: ValidationInfo, key: str, default: int) -> int:
    return int((info.context or {}).get(key, default))


def _check_text(text: str, info: ValidationInfo) -> str:
    """A turn or situation: not blank, at most `max_turn_chars` characters."""
    max_chars = _limit(info, "max_turn_chars", DEFAULT_MAX_TURN_CHARS)
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    if len(text) > max_chars:
        raise ValueError(f"too long: {len(text)} > max_turn_chars={max_chars} characters")
    return text


Text = Annotated[str, AfterValidator(_check_text)]


class RespondRequest(BaseModel):
    """A dialogue so far (speaker first, turns alternating) and, optionally, the situation behind it."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"context": ["I finally passed my driving test today!"], "situation": None}]})

    context: list[Text] = Field(..., min_length=1, description="dialogue turns, oldest first; each non-empty")
    situation: Text | None = Field(None, description="the speaker's situation (defaults to the first turn)")

    @field_validator("context")
    @classmethod
    def _max_turns(cls, turns: list[str], info: ValidationInfo) -> list[str]:
        max_turns = _limit(info, "max_turns", DEFAULT_MAX_TURNS)
        if len(turns) > max_turns:
            raise ValueError(f"too many turns: {len(turns)} > max_turns={max_turns}")
        return turns


class EmotionScore(BaseModel):
    label: str
    prob: float = Field(..., ge=0, le=1)


class ModelInfo(BaseModel):
    """Which registered model version answered."""

    name: str
    version: str
    run_id: str | None = None


class RespondResponse(BaseModel):
    """The model's answer; or, for a request the crisis screen caught (services/safety.py), the fixed supportive
    message, `screened` true, no emotion or evidence, and `model` null (no model answered)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"response": "congratulations ! that is a big deal .", "emotion": "proud",
         "emotion_top": [{"label": "proud", "prob": 0.41}, {"label": "joyful", "prob": 0.22},
                         {"label": "excited", "prob": 0.12}],
         "evidence": [{"pair": ["passed", "test"], "weight": 0.31}], "screened": False, "screen": None,
         "model": {"name": "escm", "version": "3", "run_id": "5f1c0e9b2a7d4c3e8f6a1b2c3d4e5f60"}},
        {"response": DEFAULT_MESSAGE, "emotion": None, "emotion_top": [], "evidence": [], "screened": True,
         "screen": SCREEN, "model": None},
    ]})

    response: str
    emotion: str | None = Field(None, description="predicted emotion (None for the plain Transformer)")
    emotion_top: list[EmotionScore] = Field(default_factory=list, description="top emotions, likeliest first")
    evidence: list[dict[str, Any]] = Field(
        default_factory=list,
        description="ESCM: correlated word pairs {pair, weight}; IAMM: associated words {word, ...}")
    screened: bool = Field(False, description="true: the crisis screen answered with its fixed message, "
                                              "the request never reached the model")
    screen: str | None = Field(None, description="which screen answered (\"crisis\"); null when the model did")
    model: ModelInfo | None = Field(..., description="the registered version that answered; null when screened")


class LoadError(BaseModel):
    """A version this replica was told to serve but could not load (it kept serving the old one)."""

    version: str
    error: str
    at: float = Field(..., description="unix time of the failed load")


class ChallengerStatus(BaseModel):
    mode: str = Field(..., description="shadow | split")
    share: float
    target: str = Field(..., description="what it follows: 'alias challenger' or 'version N'")
    model: ModelInfo | None = Field(None, description="the version served as challenger (None: none loaded)")
    load_error: LoadError | None = None


class ModelStatus(BaseModel):
    """GET /v1/model: the version this replica serves."""

    name: str
    version: str
    run_id: str | None = None
    source: str
    model_type: str
    loaded_at: float = Field(..., description="unix time the version was loaded")
    load_s: float = Field(..., description="seconds to download, load and warm up")
    max_batch_size: int
    batch_wait_timeout_s: float
    target: str = Field(..., description="what the champion follows: 'alias champion' or 'version N' "
                                         "(user_config.model_version)")
    alias: str | None
    load_error: LoadError | None = Field(None, description="the target's version failed to load")
    challenger: ChallengerStatus | None = None


class FieldError(BaseModel):
    field: str = Field(..., description="path of the offending field, e.g. context[2]")
    message: str


class ErrorResponse(BaseModel):
    error: str = Field(..., description="what was wrong, in one line")
    detail: list[FieldError] = Field(default_factory=list)


def field_path(loc: tuple) -> str:
    """("context", 2) -> "context[2]"; () -> "body"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def field_errors(err: ValidationError) -> list[FieldError]:
    """One FieldError per pydantic error, naming the field path (`context[2]`) and the problem."""
    out = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(FieldError(field=field_path(e["loc"]), message=msg))
    return out
