"""Conversation records and the listener-turn examples built from them.

Every loader (jsonl, official CSV release, tar.gz, s3://) returns `Conversation`s; the
MoEL/CEM/ESCM/IAMM convention then makes one `Example` per listener turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.data.emotions import EMOTION_TO_ID

SPEAKER, LISTENER = "speaker", "listener"


class DataError(ValueError):
    """A data source or record is unusable; the message names where and why."""


@dataclass(frozen=True)
class InvalidRecord:
    """One rejected conversation or row: where it came from and why."""

    conv_id: str
    reason: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}conv_id={self.conv_id!r}: {self.reason}"


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    emotion: str
    situation: str
    utterances: tuple[str, ...]
    speakers: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "conv_id": self.conv_id,
            "emotion": self.emotion,
            "situation": self.situation,
            "utterances": list(self.utterances),
            "speakers": list(self.speakers),
        }


@dataclass(frozen=True)
class Example:
    """One listener turn: context = utterances[:turn], target = utterances[turn]."""

    conv_id: str
    turn: int
    context: tuple[str, ...]
    target: str
    emotion: str
    situation: str

    @property
    def emotion_id(self) -> int:
        return EMOTION_TO_ID[self.emotion]


def validate_conversation(record: object) -> Conversation:
    """Check one decoded record against the ED format; raise `DataError` naming the problem.

    Rules: the five fields exist with the right types; the emotion is one of the 32; the
    situation and every utterance are non-empty text without invalid characters; speakers
    alternate speaker/listener starting with the speaker and match the utterances one to one.
    """
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, expected a JSON object")
    conv_id = record.get("conv_id")
    if not isinstance(conv_id, str) or not conv_id.strip():
        raise DataError("missing or empty field 'conv_id'")
    for name in ("emotion", "situation", "utterances", "speakers"):
        if name not in record:
            raise DataError(f"missing field {name!r}")
    emotion = record["emotion"]
    if emotion not in EMOTION_TO_ID:
        raise DataError(f"bad emotion label {emotion!r} (expected one of the 32 ED emotions)")
    situation = _check_text(record["situation"], "situation")
    utterances, speakers = record["utterances"], record["speakers"]
    if not isinstance(utterances, list) or not utterances:
        raise DataError("field 'utterances' must be a non-empty list")
    if not isinstance(speakers, list) or len(speakers) != len(utterances):
        raise DataError(
            f"field 'speakers' must be a list as long as 'utterances' ({len(utterances)})"
        )
    texts = tuple(_check_text(u, f"utterances[{i}]") for i, u in enumerate(utterances))
    for i, who in enumerate(speakers):
        expected = SPEAKER if i % 2 == 0 else LISTENER
        if who != expected:
            raise DataError(f"broken turn order: speakers[{i}] is {who!r}, expected {expected!r}")
    return Conversation(conv_id, emotion, situation, texts, tuple(speakers))


def _check_text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is a {type(value).__name__}, expected text")
    if not value.strip():
        raise DataError(f"field {name!r} is empty")
    if "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise DataError(f"bad encoding in field {name!r}: {value[:40]!r}")
    return value


def examples_from(conversations: list[Conversation]) -> list[Example]:
    """One example per listener turn i (i = 1, 3, 5, ...): context = utterances[:i]."""
    return [
        Example(c.conv_id, i, c.utterances[:i], c.utterances[i], c.emotion, c.situation)
        for c in conversations
        for i in range(1, len(c.utterances), 2)
    ]


@dataclass
class LoadReport:
    """What a load kept and what it rejected; `invalid` is never silently discarded."""

    conversations: list[Conversation] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)
