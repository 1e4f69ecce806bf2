"""annotate(): spaCy tokens/POS/dependency trees with whitespace dropped; tokenize() agrees with it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("spacy")

from trainers.data.annotate import (  # noqa: E402
    DEP_LABELS,
    POS_TAGS,
    ROOT_LABEL,
    Annotation,
    annotate,
    expand_contractions,
    load_pipeline,
    tokenize,
)
from trainers.data.records import DataError  # noqa: E402

TRICKY = [
    "I can't believe it.",
    "I won't go, y'all.",
    "It's fine. It's really fine!",
    "Wow!!!",
    "...",
    "?!",
    "Really?! No way... I don't think so.",
    "First sentence. Second one here. And a third?",
    "Hello  there,   friend.",
    "Line one.\nLine two.\n\nLine three.",
    "  leading and trailing spaces  ",
    "tabs\tand\u00a0non-breaking spaces",
    "I love it 😀😀 so much 🎉!",
    "Café naïve résumé — “quoted” text…",
    "\n\n\n",
    "   ",
    "",
    "A",
    "OMG ThIs Is MiXeD CaSe",
    "I was like ... \n ... whatever",
    "Hi.  \n Bye.",
]


@pytest.fixture(scope="module")
def nlp():
    try:
        return load_pipeline()
    except DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tricky(nlp) -> list[Annotation]:
    return annotate(TRICKY, nlp, batch_size=8)


def check_well_formed(ann: Annotation) -> None:
    n = len(ann.tokens)
    assert len(ann.pos) == len(ann.heads) == len(ann.deps) == n
    assert all(t and not t.isspace() for t in ann.tokens)
    assert all(t == t.lower() for t in ann.tokens)
    assert all(p in POS_TAGS for p in ann.pos)
    assert all(d in DEP_LABELS for d in ann.deps)
    if n == 0:
        assert ann.sent_starts == ()
        return
    assert ann.sent_starts[0] == 0
    assert list(ann.sent_starts) == sorted(set(ann.sent_starts))
    bounds = list(ann.sent_starts) + [n]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        assert lo < hi, "empty sentence"
        for i in range(lo, hi):
            assert lo <= ann.heads[i] < hi, f"head of token {i} leaves its sentence {lo}..{hi}"
        roots = [i for i in range(lo, hi) if ann.heads[i] == i]
        assert len(roots) == 1, f"sentence {lo}..{hi} has roots {roots}"
        assert [i for i in range(lo, hi) if ann.deps[i] == ROOT_LABEL] == roots
        for i in range(lo, hi):  # following heads reaches the root without a cycle
            seen, j = set(), i
            while ann.heads[j] != j:
                assert j not in seen, f"cycle through token {j}"
                seen.add(j)
                j = ann.heads[j]
            assert j == roots[0]


def test_sizes_fit_model_defaults():
    assert len(POS_TAGS) + 2 <= 20 and len(DEP_LABELS) + 2 <= 48
    assert len(set(POS_TAGS)) == len(POS_TAGS) and len(set(DEP_LABELS)) == len(DEP_LABELS)
    assert POS_TAGS.index("ADJ") == 0 and DEP_LABELS.index("ROOT") == 0  # ids are frozen


def test_labels_cover_the_pipeline(nlp):
    assert set(nlp.get_pipe("parser").labels) <= set(DEP_LABELS)


def test_excluded_components(nlp):
    assert "ner" not in nlp.pipe_names and "lemmatizer" not in nlp.pipe_names
    assert {"tok2vec", "tagger", "parser"} <= set(nlp.pipe_names)


def test_missing_model_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="pip install"):
        load_pipeline(str(tmp_path / "no_such_model"))


def test_every_tricky_text_is_well_formed(tricky):
    assert len(tricky) == len(TRICKY)
    for text, ann in zip(TRICKY, tricky, strict=True):
        try:
            check_well_formed(ann)
        except AssertionError as e:
            raise AssertionError(f"{text!r}: {e}") from e


def by_text(tricky, text):
    return tricky[TRICKY.index(text)]


def test_contractions_split_like_spacy(tricky):
    assert by_text(tricky, "I can't believe it.").tokens == ("i", "ca", "n't", "believe", "it", ".")
    assert by_text(tricky, "I won't go, y'all.").tokens[:3] == ("i", "wo", "n't")
    assert "'s" in by_text(tricky, "It's fine. It's really fine!").tokens
    assert "y'" in by_text(tricky, "I won't go, y'all.").tokens


def test_expanding_contractions_follows_the_authors_rewrite(nlp):
    assert expand_contractions("I'm sure Don't it’s isn't") == "I am sure Do not it is is not"
    assert expand_contractions("Bit's rim'm can'tt") == "Bit's rim'm can'tt"  # whole words only
    expanding = load_pipeline(contractions="expand")
    texts = ["I can't believe it.", "I won't go, y'all.", "It's fine. It's really fine!"]
    parsed = annotate(texts, expanding, batch_size=8)
    assert parsed[0].tokens == ("i", "can", "not", "believe", "it", ".")
    assert parsed[1].tokens[:4] == ("i", "will", "not", "go") and "y'" in parsed[1].tokens  # not in the list
    assert parsed[2].tokens[:4] == ("it", "is", "fine", ".")
    assert tokenize(texts, expanding) == [a.tokens for a in parsed]
    for a in parsed:
        check_well_formed(a)
    with pytest.raises(ValueError, match="contractions"):
        load_pipeline(contractions="split")


def test_punctuation_runs(tricky):
    assert by_text(tricky, "Wow!!!").tokens == ("wow", "!", "!", "!")
    assert by_text(tricky, "...").tokens == ("...",)
    assert by_text(tricky, "...").pos == ("PUNCT",)
    assert all(p == "PUNCT" for p in by_text(tricky, "?!").pos)


def test_multiple_sentences(tricky):
    ann = by_text(tricky, "First sentence. Second one here. And a third?")
    assert ann.tokens[ann.sent_starts[1]] == "second"
    assert ann.tokens[ann.sent_starts[2]] == "and"
    assert len(ann.sent_starts) == 3
    ann = by_text(tricky, "It's fine. It's really fine!")
    assert ann.sent_starts == (0, 4)


def test_whitespace_dropped_and_heads_remapped(tricky, nlp):
    ann = by_text(tricky, "Line one.\nLine two.\n\nLine three.")
    assert ann.tokens == ("line", "one", ".", "line", "two", ".", "line", "three", ".")
    # The raw parse has whitespace tokens that other tokens may hang from; none survives.
    raw = nlp("Line one.\nLine two.\n\nLine three.")
    assert any(t.is_space for t in raw)
    assert by_text(tricky, "Hello  there,   friend.").tokens == ("hello", "there", ",", "friend", ".")
    ann = by_text(tricky, "  leading and trailing spaces  ")
    assert ann.tokens == ("leading", "and", "trailing", "spaces")
    assert by_text(tricky, "tabs\tand\u00a0non-breaking spaces").tokens[:2] == ("tabs", "and")


def test_whitespace_only_and_empty_texts(tricky):
    for text in ("\n\n\n", "   ", ""):
        ann = by_text(tricky, text)
        assert ann.tokens == () and ann.heads == () and ann.sent_starts == ()
    assert by_text(tricky, "A").heads == (0,) and by_text(tricky, "A").deps == (ROOT_LABEL,)


def test_leading_space_head_is_remapped(nlp):
    # spaCy makes a leading space token a child of the root; a space's children must climb past it.
    (ann,) = annotate([" Hello there"], nlp)
    assert ann.tokens == ("hello", "there") and ann.heads == (0, 0)


def test_unicode_and_lower_casing(tricky):
    assert "😀" in by_text(tricky, "I love it 😀😀 so much 🎉!").tokens or \
        "😀😀" in by_text(tricky, "I love it 😀😀 so much 🎉!").tokens
    assert "café" in by_text(tricky, "Café naïve résumé — “quoted” text…").tokens
    assert by_text(tricky, "OMG ThIs Is MiXeD CaSe").tokens == ("omg", "this", "is", "mixed", "case")


def test_duplicates_parsed_once_and_aligned(nlp):
    texts = ["Same text.", "Other text!", "Same text."]
    anns = annotate(texts, nlp)
    assert anns[0] is anns[2] and anns[0].tokens == ("same", "text", ".")
    assert anns[1].tokens == ("other", "text", "!")


def test_multiprocess_gives_the_same_annotations(nlp):
    texts = TRICKY[:8] * 3 + [f"Sentence number {i}. It is here." for i in range(40)]
    assert annotate(texts, nlp, batch_size=7, n_process=2) == annotate(texts, nlp, batch_size=64)


def test_tokenize_matches_annotate(tricky, nlp):
    assert tokenize(TRICKY, nlp) == [a.tokens for a in tricky]


def _ed_texts(limit: int) -> list[str]:
    data_dir = os.environ.get("ED_DATA_DIR")
    if not data_dir:
        pytest.skip("ED_DATA_DIR not set")
    texts: list[str] = []
    with (Path(data_dir) / "ed_valid.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts.append(record["situation"])
            texts.extend(record["utterances"])
            if len(texts) >= limit:
                break
    return texts[:limit]


def test_real_utterances_well_formed_and_tokenize_agrees(nlp):
    texts = _ed_texts(1500)
    anns = annotate(texts, nlp)
    for ann in anns:
        check_well_formed(ann)
    assert tokenize(texts, nlp) == [a.tokens for a in anns]


def hand_parsed(nlp, words, heads, deps):
    from spacy.tokens import Doc

    pos = ["SPACE" if w.isspace() else "NOUN" for w in words]
    return Doc(nlp.vocab, words=words, spaces=[False] * len(words), heads=heads, deps=deps, pos=pos)


def test_dropped_root_keeps_one_root_per_sentence(nlp):
    from trainers.data.annotate import _annotate_doc

    # sentence 1: a whitespace root with two real children; sentence 2: a -> " " -> "\n" -> b (root)
    doc = hand_parsed(nlp, ["hello", "\n", "world", "a", " ", "\n", "b"],
                      heads=[1, 1, 1, 4, 5, 6, 6],
                      deps=["intj", "ROOT", "npadvmod", "amod", "dep", "dep", "ROOT"])
    assert [s.start for s in doc.sents] == [0, 3]
    ann = _annotate_doc(doc)
    check_well_formed(ann)
    assert ann.tokens == ("hello", "world", "a", "b")
    assert ann.sent_starts == (0, 2)
    assert ann.heads == (0, 0, 3, 3)  # world re-attached to the promoted root; a climbed to b
    assert ann.deps == ("ROOT", "npadvmod", "amod", "ROOT")


def test_unknown_labels_fall_back(nlp):
    from trainers.data.annotate import _annotate_doc

    doc = hand_parsed(nlp, ["x", "y"], heads=[1, 1], deps=["weird_label", "ROOT"])
    ann = _annotate_doc(doc)
    assert ann.deps == ("dep", "ROOT") and ann.heads == (1, 1)
