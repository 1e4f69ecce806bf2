"""The crisis-language screen: a request that speaks of suicide or self-harm is answered with a fixed supportive
message pointing to professional help, and never reaches the model.

    screen = CrisisScreen(CrisisScreenConfig())          # on, the default lexicon below
    screen.match(Request(["I want to end my life."]))    # -> "end my life" (what matched); None: not screened
    respond_screened(screen, responder.respond, requests)  # the fixed answer for screened requests, the model's
                                                           # (one call, the others only) for the rest, in order

It is a keyword screen, not a safety system: it misses crisis language it has no phrase for (false negatives)
and answers some harmless text with the message (false positives: a film title, a friend's story). Every context
turn and the situation are matched after `normalize` (Unicode NFKC, case-folded, apostrophes dropped so "don't"
is "dont", any other run of non-letters and non-digits one space); a phrase matches whole words ("killing it at
work" is not "killing myself"), a pattern is a regular expression searched in the normalised text.

The Serve path screens each request before routing (services/replica.py: `Replica.answer`, counted in
`edp_crisis_screened_total`); the pyfunc model screens each batch (services/pyfunc_model.py, `respond_screened`).
Configured by the Serve config's `args.crisis_screen` (CrisisScreenConfig) or the pyfunc model's
`model_config["crisis_screen"]`. Imports no torch, Ray or MLflow.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from trainers.config import StrictModel

if TYPE_CHECKING:
    from trainers.inference import Answer, Request

SCREEN = "crisis"  # the response's `screen` value for a request this screen answered

# Phrases that, in practice, mostly mean the speaker is thinking of suicide or self-harm. Kept short on purpose:
# on ED's train + valid (22,301 conversations) the defaults (with the patterns) flag 16: 9 speak of suicide or
# self-harm (the speaker's or someone else's), 7 of wanting to die or an ended life, some meant, some figures of
# speech ("I just want to die when I am on [gluten]", "no way I would let a stingray end my life").
DEFAULT_PHRASES: tuple[str, ...] = (
    "suicide", "suicidal", "kill myself", "killing myself", "end my life", "ending my life", "end my own life",
    "take my own life", "taking my own life", "end it all", "better off dead", "wish i was dead",
    "wish i were dead", "no reason to live", "nothing to live for", "not worth living", "self harm", "selfharm",
    "self injury", "harm myself", "harming myself", "hang myself",
)
# Regular expressions over the normalised text, for phrases whose plain form is often harmless.
DEFAULT_PATTERNS: tuple[str, ...] = (
    # "I don't want to live (anymore)", not "I do not want to live there / with my parents"
    r"\b(dont|do not|no longer) want to (live|be alive)\b(?! (there|here|in|at|near|with|on|by|somewhere|anywhere"
    r"|abroad|downtown|together|close))",
    # "I want to die", not "I didn't want to die!", "want to die of embarrassment", "die laughing"
    r"(?<!dont )(?<!didnt )(?<!doesnt )(?<!not )(?<!never )\b(want to|wanna) die\b"
    r"(?! (of|from|laughing|alone|happy|old))",
    # "I want to hurt myself", "I keep cutting myself", not "I hurt myself playing football"
    r"\b(want to|wanna|going to|gonna|urge to|tempted to|thinking about|thought about|keep|started) "
    r"(hurt|hurting|cut|cutting) myself\b",
)
DEFAULT_MESSAGE = (
    "I'm really glad you reached out, and I'm sorry you're going through this. I'm an automated listener and "
    "can't help in a crisis, but people can, right now. If you might be in danger, please call your local "
    "emergency number. In the US you can call or text 988 (Suicide & Crisis Lifeline); elsewhere, "
    "findahelpline.com lists free, confidential crisis lines in your country."
)

_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`\u00b4]")
_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Case-folded words separated by single spaces: "I DON'T  want to... live!" -> "i dont want to live"."""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(_NON_WORD.sub(" ", text).split())


class CrisisScreenConfig(StrictModel):
    """`crisis_screen` in a Serve application's args (and the pyfunc model's model_config); unknown keys are
    errors."""

    enabled: bool = Field(True, description="screen requests (false: every request reaches the model)")
    phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_PHRASES),
                               description="whole-word phrases (replaces the default list)")
    extra_phrases: list[str] = Field(default_factory=list, description="phrases added to `phrases`")
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS),
                                description="regular expressions over the normalised text (replaces the defaults)")
    message: str = Field(DEFAULT_MESSAGE, description="the fixed reply to a screened request")

    @field_validator("phrases", "extra_phrases")
    @classmethod
    def _words(cls, phrases: list[str], info) -> list[str]:
        for i, p in enumerate(phrases):
            if not normalize(p):
                raise ValueError(f"{info.field_name}[{i}] {p!r} has no words (letters or digits)")
        return phrases

    @field_validator("patterns")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for i, p in enumerate(patterns):
            try:
                compiled = re.compile(p)
            except re.error as e:
                raise ValueError(f"patterns[{i}] {p!r} is not a valid regular expression: {e}") from e
            if compiled.search("") is not None:
                raise ValueError(f"patterns[{i}] {p!r} matches the empty string, so it would screen every request")
        return patterns

    @field_validator("message")
    @classmethod
    def _message(cls, message: str) -> str:
        if not message.strip():
            raise ValueError("must not be empty or only whitespace")
        return message

    @model_validator(mode="after")
    def _something_to_match(self) -> CrisisScreenConfig:
        if self.enabled and not (self.phrases or self.extra_phrases or self.patterns):
            raise ValueError("enabled, but phrases, extra_phrases and patterns are all empty "
                             "(set enabled: false to turn the screen off)")
        return self


class CrisisScreen:
    """A compiled CrisisScreenConfig: `match` a request, `answer` a screened one."""

    def __init__(self, config: CrisisScreenConfig | None = None):
        self.config = config or CrisisScreenConfig()
        phrases = sorted({normalize(p) for p in (*self.config.phrases, *self.config.extra_phrases)},
                         key=len, reverse=True)
        self._phrases = re.compile(r"\b(?:" + "|".join(map(re.escape, phrases)) + r")\b") if phrases else None
        self._patterns = [re.compile(p) for p in self.config.patterns]

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def match(self, request: Request) -> str | None:
        """What matched in the request's turns or situation (a phrase, or a pattern's match); None when nothing
        did or the screen is off."""
        if not self.enabled:
            return None
        for text in (*request.context, request.situation or ""):
            found = self.match_text(text)
            if found is not None:
                return found
        return None

    def match_text(self, text: str) -> str | None:
        """What matched in one text, normalised; None when nothing did."""
        words = normalize(text)
        hit = self._phrases.search(words) if self._phrases else None
        hit = hit or next((m for m in (p.search(words) for p in self._patterns) if m), None)
        return None if hit is None else hit.group(0)

    def answer(self) -> Answer:
        """The fixed answer: the message, no emotion, no evidence, flagged `screen="crisis"`."""
        from trainers.inference import Answer  # here, not at import: the replica module stays torch-free

        return Answer(response=self.config.message, screen=SCREEN)


def respond_screened(screen: CrisisScreen, respond: Callable[[list[Request]], list[Answer]],
                     requests: Sequence[Request]) -> list[Answer]:
    """One answer per request, in order: the fixed one for each screened request, the model's for the others
    from a single `respond` call on them alone (no call when every request was screened)."""
    fixed = [screen.answer() if screen.match(r) is not None else None for r in requests]
    todo = [r for r, a in zip(requests, fixed, strict=True) if a is None]
    generated = iter(respond(todo) if todo else [])
    return [a if a is not None else next(generated) for a in fixed]
