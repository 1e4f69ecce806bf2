"""The word vocabulary shared by training and serving, saved as a JSON artifact.

Tokens are the annotator's (spaCy) tokens, lower-cased. Ids 0..7 are the special tokens
of trainers.tokens; the 32 emotion words always follow them, so the emotion-word embeddings E_e of
ESCM (eq. 3) exist whatever the frequency cut-off.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from trainers.data.emotions import EMOTIONS
from trainers.data.records import DataError
from trainers.tokens import EOS, PAD, SOS, SPECIALS, UNK


class Vocab:
    """Token <-> id map. `encode` maps unknown words to UNK; `itos[i]` is token i."""

    def __init__(self, itos: list[str]):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise DataError(f"vocabulary must start with the special tokens {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("vocabulary has duplicate tokens")
        missing = [e for e in EMOTIONS if e not in self.stoi]
        if missing:
            raise DataError(f"vocabulary lacks emotion words {missing}")

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        reserved = set(SPECIALS) | set(EMOTIONS)
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in reserved),
                       key=lambda w: (-counts[w], w))
        itos = list(SPECIALS) + list(EMOTIONS) + words
        if max_size is not None:
            itos = itos[:max(max_size, len(SPECIALS) + len(EMOTIONS))]
        return cls(itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> list[str]:
        out = []
        for i in ids:
            if stop_at_eos and i == EOS:
                break
            if i not in (PAD, SOS):
                out.append(self.itos[i] if i < len(self.itos) else "[UNK]")
        return out

    def emotion_ids(self) -> list[int]:
        """Word ids of the 32 emotion words, in `EMOTIONS` order (E_e of ESCM eq. 3)."""
        return [self.stoi[e] for e in EMOTIONS]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "edp-vocab/1", "itos": self.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read vocabulary {path}: {e}") from e
        if data.get("format") != "edp-vocab/1":
            raise DataError(f"{path} is not an edp vocabulary (format {data.get('format')!r})")
        return cls(data["itos"])
