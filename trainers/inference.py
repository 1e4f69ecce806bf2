"""`Responder`: a trained checkpoint answering dialogue contexts, batched (MLflow pyfunc and Ray Serve use it).

Preprocessing is the training pipeline's, behind one entry (`collate.encode_requests`): the same spaCy
pipeline (from the checkpoint's data config), the same vocabulary (stored in the checkpoint), the same
featurisation, encoding and padding. A request has no target and no gold emotion; without a situation its
first turn stands in (IAMM's eq. 3 input). Under the run's `unseen_vectors` its context words outside the vocabulary
get their pretrained vectors from the lookup `edp evaluate` uses (trainers/data/unseen.py), loaded once here; a
source that is missing or does not load fails the load, naming it. A served request's path, file by file:

    services/app.py (HTTP) -> services/schemas.py (validation) -> services/replica.py (version, batch queue,
    challenger routing) -> trainers/inference.py (this) -> trainers/data/collate.py (`encode_requests`)
    -> the model (trainers/models/) -> trainers/decoding.py

    responder = Responder.from_bundle("bundle/")   # trainers.artifacts; or from_checkpoint("best.pt")
    responder.respond([Request(["I passed my driving test!"])])
    -> [Answer(response="...", emotion="proud", emotion_top=[{"label", "prob"}, ...], evidence=[...],
               tokens_generated=9)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainers import artifacts
from trainers.config import InferenceConfig
from trainers.data import annotate as ann
from trainers.data.collate import EncodedExample, encode_requests
from trainers.data.emotions import EMOTIONS
from trainers.data.knowledge import build_knowledge
from trainers.data.unseen import unseen_vectors_for
from trainers.decoding import decode, ids_to_tokens
from trainers.device import autocast, resolve_device
from trainers.models.batch import Batch

# bf16 on a CPU pays only for batches: for a single request the casts cost more than the bf16 matmuls save
# (paper-sized ESCM, AVX512-BF16 CPU, 1 thread), for a batch the output layer's matmuls dominate. GPUs use bf16
# at any batch size.
CPU_BF16_MIN_BATCH = 8


@dataclass(frozen=True)
class Request:
    """One dialogue to answer: its turns, oldest first (speaker first), and optionally the situation."""

    context: list[str]
    situation: str | None = None


@dataclass(frozen=True)
class Answer:
    """The Responder's answer to one Request; `body()` is what the HTTP endpoint and the pyfunc model return."""

    response: str
    emotion: str | None = None                                          # None for the plain Transformer
    emotion_top: list[dict[str, Any]] = field(default_factory=list)     # [{"label", "prob"}], likeliest first
    evidence: list[dict[str, Any]] = field(default_factory=list)        # ESCM {pair, weight}; IAMM {word, ...}
    tokens_generated: int = 0
    screen: str | None = None                                           # "crisis": services/safety.py answered

    def body(self) -> dict[str, Any]:
        return {"response": self.response, "emotion": self.emotion, "emotion_top": self.emotion_top,
                "evidence": self.evidence, "screened": self.screen is not None, "screen": self.screen}


class Responder:
    """Load once, warm up, then `respond` to batches of requests (pure; no I/O per call)."""

    def __init__(self, cfg: InferenceConfig, model: torch.nn.Module, vocab, device: str = "cpu", top_k: int = 3):
        self.cfg, self.model, self.vocab, self.top_k = cfg, model.eval(), vocab, top_k
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.nlp = ann.load_pipeline(cfg.data.spacy_model, cfg.data.contractions)
        kwargs = {"path": cfg.data.knowledge_path} if cfg.data.knowledge_path else {}
        if cfg.data.knowledge == "precomputed":
            kwargs["on_missing"] = "empty"  # unseen request text: nothing to associate, counted by the source
        self.knowledge = build_knowledge(cfg.data.knowledge, **kwargs)
        self.unseen = unseen_vectors_for(cfg, model.cfg.emb_dim)  # `unseen_vectors`: loaded once, as edp evaluate
        self.decode_config = cfg.decode_config()

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu") -> Responder:
        loaded = artifacts.load(path, device)
        return cls(loaded.inference_config(), loaded.model, loaded.vocab, device)

    @classmethod
    def from_bundle(cls, path, device: str = "cpu") -> Responder:
        """From a serving bundle directory: safetensors + JSON, nothing unpickled (what the registry serves)."""
        loaded = artifacts.load(path, device, bundle_only=True)
        return cls(loaded.inference_config(), loaded.model, loaded.vocab, device)

    @property
    def model_name(self) -> str:
        return self.cfg.model

    def encode(self, requests: Sequence[Request]) -> tuple[list[EncodedExample], Batch]:
        """The requests' encoded examples and their padded batch (`collate.encode_requests`), on the CPU."""
        return encode_requests([(r.context, r.situation) for r in requests], self.vocab, self.knowledge, self.nlp,
                               iamm=self.cfg.model == "iamm", max_context=self.cfg.max_context,
                               max_target=self.cfg.max_target, unseen=self.unseen)

    @torch.inference_mode()
    def respond(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer a batch of requests in one padded batch (ESCM eqs. 15/19 or IAMM eqs. 25/33)."""
        encoded, batch = self.encode(requests)
        batch = batch.to(self.device)
        with autocast(self.cfg.bf16, self.device, min_cpu_batch=CPU_BF16_MIN_BATCH, batch=len(requests)):
            enc = self.model.encode(batch)  # one encoder pass for everything below
            ids = decode(self.model, batch, self.decode_config, state=enc)
            evidence = self._evidence(batch, encoded, enc)
        tokens = ids_to_tokens(ids.tolist(), self.vocab.itos, [e.oov for e in encoded])
        logits = enc.emotion_logits
        probs = None if logits is None else torch.softmax(logits.float(), -1).cpu()
        out = []
        for j, toks in enumerate(tokens):
            top = [] if probs is None else [
                {"label": EMOTIONS[int(k)], "prob": round(float(p), 4)}
                for p, k in zip(*probs[j].topk(self.top_k))
            ]
            out.append(Answer(response=detokenize(toks), emotion=top[0]["label"] if top else None,
                              emotion_top=top, evidence=evidence[j], tokens_generated=len(toks)))
        return out

    def _evidence(self, batch: Batch, encoded, enc) -> list[list[dict]]:
        """ESCM: the most strongly correlated word pairs (GCN p_ij); IAMM: the top associated words."""
        V = len(self.vocab)
        words = [[self.vocab.itos[i] if i < V else e.oov[i - V] for i in e.context_ext_ids.tolist()] for e in encoded]
        if self.cfg.model == "escm" and hasattr(self.model, "evidence") and not self.model.cfg.no_dcgcn:
            ev = self.model.evidence(batch, encoding=enc)
            return [[{"pair": [words[b][i], words[b][j]], "weight": round(float(s), 4)}
                     for (i, j), s in zip(ev["pairs"][b].tolist(), ev["scores"][b].tolist()) if i >= 0]
                    for b in range(len(encoded))]
        if self.cfg.model == "iamm" and hasattr(self.model, "associated_words"):
            return [[{**a, "word": self._word_of(a, e)} for a in assoc]
                    for assoc, e in zip(self.model.associated_words(batch, enc), encoded)]
        return [[] for _ in encoded]

    def _word_of(self, assoc: dict, e) -> str:
        wid = assoc.get("id")
        return self.vocab.itos[wid] if isinstance(wid, int) and 0 <= wid < len(self.vocab) else str(wid)

    def warm_up(self) -> None:
        self.respond([Request(["Hello, how are you today?"])])


def detokenize(tokens: list[str]) -> str:
    """Join model tokens into readable text: no space before punctuation or clitics ("n't", "'s")."""
    out = ""
    for t in tokens:
        if out and not (t in {".", ",", "!", "?", ";", ":", "%", ")"} or t.startswith("'") or t == "n't"):
            out += " "
        out += t
    return out[:1].upper() + out[1:]
