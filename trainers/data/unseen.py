"""Unseen context words at evaluation and serving (`unseen_vectors` in InferenceConfig).

The vocabulary is the training split's, so a context word first met at evaluation or in a request is [UNK]. The
authors' reference builds its vocabulary over every split, so there such a word keeps its pretrained vector; the
honest equivalent, which reads no evaluation text at training time: with `unseen_vectors` on, a context word outside
the vocabulary that has a vector in the run's own vector source (`data.vectors`, the source its embedding matrix
was built from: trainers/data/vectors.py) is embedded with that vector times `vector_scale` (the factor training
applied to the pretrained vectors, trainers.loop.init_word_embedding: 1 for `embedding_init: vectors`, the rescaling
factor for `rescaled`), then x sqrt(emb_dim) as every word-table row, instead of the [UNK] row. It stays an OOV
word otherwise: it keeps its extended id in `context_ext_ids`, so the pointer-generator can copy it (and the
decoder's input after a copy is the [UNK] row, as for any copied OOV word).

One implementation for `edp evaluate` (trainers.evaluation) and serving (trainers.inference.Responder, which the Serve
replica and the pyfunc model run): `unseen_vectors_for(cfg, emb_dim)` decides from the run's config and loads the
source once; `collate.encode_example(..., unseen=...)` attaches each example's vectors, which `pad_escm` /
`pad_iamm` put in the batch (`unseen_vectors`, `context_unseen`, IAMM's `utt_unseen` and `situation_unseen`) and
the models substitute at those positions (trainers.models.interface, `with_unseen`). Training never builds one.
"""

from __future__ import annotations

import numpy as np

from trainers.config import InferenceConfig
from trainers.data.records import DataError
from trainers.data.vectors import WordVectors

CACHE_WORDS = 100_000  # lookups kept per UnseenVectors (a replica meets arbitrary words): cleared when full


class UnseenVectors:
    """Scaled vectors of words outside the vocabulary, from one vector source; lookups are cached per word."""

    def __init__(self, vectors: WordVectors, scale: float):
        if not scale > 0:
            raise ValueError(f"vector_scale must be > 0, got {scale!r}")
        self.vectors, self.scale, self.dim = vectors, float(scale), vectors.dim
        self.source_name = vectors.source_name
        self._cache: dict[str, np.ndarray | None] = {}

    def lookup(self, words: list[str]) -> list[np.ndarray | None]:
        """Per word its vector x `scale` (float32), None where the source has none."""
        if len(self._cache) > CACHE_WORDS:
            self._cache.clear()
        for w in words:
            if w not in self._cache:
                v = self.vectors.get(w)
                self._cache[w] = None if v is None else (v * np.float32(self.scale)).astype(np.float32)
        return [self._cache[w] for w in words]

    def describe(self) -> dict:
        return {"source": self.source_name, "scale": self.scale}


def unseen_vectors_for(cfg: InferenceConfig, emb_dim: int) -> UnseenVectors | None:
    """The lookup a model run with `cfg` uses for unseen context words (None: `unseen_vectors` is off). Raises
    DataError naming the setting when it cannot apply: no vector source, no recorded scale, a source that is
    missing or does not load."""
    if not cfg.unseen_vectors:
        return None
    if cfg.data.vectors == "none":
        raise DataError("unseen_vectors is on but the run has no vector source (data.vectors: 'none'); "
                        "turn it off (--no-unseen-vectors / unseen_vectors: false)")
    if cfg.vector_scale is None:
        raise DataError("unseen_vectors is on but the run does not record vector_scale, the factor its training "
                        "applied to the word vectors (a run before the option, with embedding_init 'rescaled'); "
                        "turn it off, or give vector_scale explicitly")
    try:
        vectors = WordVectors(cfg.data.vectors, emb_dim)
    except DataError as e:
        raise DataError(f"unseen_vectors: cannot load the run's vector source data.vectors={cfg.data.vectors!r}: "
                        f"{e}") from e
    return UnseenVectors(vectors, cfg.vector_scale)
