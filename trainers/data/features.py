"""Featurisation: an example's texts -> the features collate encodes; the one path for training data and requests.

    distinct texts --annotate (spaCy)--> Annotation --featurize_texts--> TextFeatures
        (vocabulary ids, POS and dependency-label ids, heads, sentence starts, commonsense knowledge ids)
    (context turns, situation, optional target) --featurize--> ExampleFeatures (indices into TextFeatures)
    TextFeatures + ExampleFeatures --collate.encode_example--> EncodedExample --pad_escm/pad_iamm--> batch

`prepare.build_split` featurises a whole split (every distinct text once, shared by its examples) and
`collate.encode_requests` (what `trainers.inference.Responder` calls) a batch of requests (no target, no gold
emotion) with the same two calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainers.data import annotate as ann
from trainers.data.knowledge import RELATIONS
from trainers.data.vocab import Vocab

POS_ID = {p: i + 2 for i, p in enumerate(ann.POS_TAGS)}     # 0 pad, 1 [CLS]
DEP_ID = {d: i + 2 for i, d in enumerate(ann.DEP_LABELS)}   # 0 no edge, 1 self loop (tokens.DEP_SELF)


@dataclass
class TextFeatures:
    """Distinct texts and their features, as parallel lists.

    texts[i] is utterance or situation text i; tokens[i] its tokens; ids[i] its vocab ids (words outside
    the vocabulary are UNK; collate gives them pointer-generator extended ids); pos/heads/deps its parse
    (ids as in `POS_ID` / `DEP_ID`); sents[i] its sentence start indices; knowledge[i] (IAMM) maps
    relation -> list of token-id lists (empty with the `none` backend).
    """

    texts: list[str]
    tokens: list[tuple[str, ...]]
    ids: list[list[int]]
    pos: list[list[int]]
    heads: list[list[int]]
    deps: list[list[int]]
    sents: list[list[int]]
    knowledge: list[dict[str, list[list[int]]]]


@dataclass(frozen=True, slots=True)
class ExampleFeatures:
    """One example as indices into its `TextFeatures`: context turns, situation, target (None for a request)."""

    context: tuple[int, ...]
    situation: int
    target: int | None = None
    emotion: int | None = None     # gold emotion id (training data); None for a request


def featurize_texts(texts: Sequence[str], table: dict[str, ann.Annotation], vocab: Vocab, knowledge,
                    nlp) -> TextFeatures:
    """Features of `texts` from their annotations (`table`: text -> Annotation) and the knowledge source."""
    annotations = [table[t] for t in texts]
    unknown_dep = DEP_ID["dep"]
    return TextFeatures(
        texts=list(texts),
        tokens=[a.tokens for a in annotations],
        ids=[vocab.encode(a.tokens) for a in annotations],
        pos=[[POS_ID.get(p, POS_ID["X"]) for p in a.pos] for a in annotations],
        heads=[list(a.heads) for a in annotations],
        deps=[[DEP_ID.get(d, unknown_dep) for d in a.deps] for a in annotations],
        sents=[list(a.sent_starts) for a in annotations],
        knowledge=_knowledge_ids(list(texts), knowledge, vocab, nlp),
    )


def featurize(context: Sequence[str], situation: str | None, target: str | None, index: dict[str, int],
              emotion: int | None = None) -> ExampleFeatures:
    """One example against the featurised texts (`index`: text -> position in its TextFeatures).

    Without a situation the first turn stands in for it (IAMM's eq. 3 input needs one).
    """
    return ExampleFeatures(
        context=tuple(index[t] for t in context),
        situation=index[context[0] if situation is None else situation],
        target=None if target is None else index[target],
        emotion=emotion,
    )


def example_texts(context: Sequence[str], situation: str | None, target: str | None = None) -> list[str]:
    """The texts `featurize` looks up for one example (annotate and featurise these first)."""
    return [*context, *([] if target is None else [target]), context[0] if situation is None else situation]


def _knowledge_ids(texts: list[str], knowledge, vocab: Vocab, nlp) -> list[dict[str, list[list[int]]]]:
    """Relation texts per text (IAMM eqs. 4-7 inputs), tokenised like every other text."""
    if not knowledge.available:
        return [{} for _ in texts]
    inferred = knowledge.infer(texts)
    phrases = sorted({p for rel in inferred for r in RELATIONS for p in rel.get(r, [])})
    ids = dict(zip(phrases, (vocab.encode(t) for t in ann.tokenize(phrases, nlp))))
    return [{r: [ids[p] for p in rel.get(r, [])] for r in RELATIONS} for rel in inferred]
