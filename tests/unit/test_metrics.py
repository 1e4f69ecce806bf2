"""Metrics against values computed by hand (see the comments)."""

import math
import random

import numpy as np
import pytest
import torch
from sacrebleu.metrics import BLEU

from trainers.metrics import (
    MetricAccumulator,
    bleu,
    confusion_matrix,
    distinct_n,
    emotion_accuracy,
    example_perplexity,
    nltk_words,
    sampled,
    token_perplexity,
)

# Three responses:
#   unigrams: i am sad | i am happy | so sad -> 8 in all, unique {i, am, sad, happy, so} = 5 -> 5/8
#   bigrams:  (i am)(am sad) | (i am)(am happy) | (so sad) -> 5 in all, unique 4 -> 4/5
# A per-response average would give 1.0 for both, so these values pin the corpus-level definition.
RESPONSES = [["i", "am", "sad"], ["i", "am", "happy"], ["so", "sad"]]


def test_distinct_is_corpus_level():
    assert distinct_n(RESPONSES, 1) == pytest.approx(5 / 8)
    assert distinct_n(RESPONSES, 2) == pytest.approx(4 / 5)


def test_distinct_edge_cases():
    # "a a a a": 4 unigrams, 1 unique; 3 bigrams, 1 unique. Empty / too-short responses add nothing.
    assert distinct_n([["a", "a", "a", "a"], []], 1) == pytest.approx(1 / 4)
    assert distinct_n([["a", "a", "a", "a"], ["b"]], 2) == pytest.approx(1 / 3)
    assert distinct_n([["a"], []], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(RESPONSES, 0)


def test_token_perplexity_of_known_nll():
    # 10 tokens each with probability 1/5 -> NLL 10 ln 5 -> PPL 5.
    assert token_perplexity(10 * math.log(5), 10) == pytest.approx(5.0)
    assert token_perplexity(0.0, 3) == 1.0
    assert math.isfinite(token_perplexity(1e6, 1))            # capped exponent, no OverflowError
    with pytest.raises(ValueError, match="num_tokens"):
        token_perplexity(1.0, 0)


def test_the_two_perplexities_differ_on_one_short_and_one_long_example():
    # A short example of 1 token (EOS) at probability 1/2 and a long one of 9 tokens each at probability 1/8:
    #   per example (papers): mean NLLs ln 2 and 3 ln 2 -> exp(2 ln 2) = 4
    #   token-level:          (ln 2 + 27 ln 2) / 10 tokens = 2.8 ln 2 -> 2^2.8 ~ 6.96
    nll, tokens = [math.log(2), 9 * math.log(8)], [1, 9]
    assert example_perplexity(nll, tokens) == pytest.approx(4.0)
    assert token_perplexity(sum(nll), sum(tokens)) == pytest.approx(2 ** 2.8)
    # the same 10 tokens grouped 4 + 6 (the 1/2 token with three 1/8 ones): means 2.5 ln 2 and 3 ln 2; only the
    # per-example figure moves
    assert example_perplexity([math.log(2) + 3 * math.log(8), 6 * math.log(8)], [4, 6]) == pytest.approx(2 ** 2.75)
    # equal lengths: the two agree
    assert example_perplexity([2.0, 4.0], [2, 2]) == pytest.approx(token_perplexity(6.0, 4))


def test_example_perplexity_rejects_bad_input():
    with pytest.raises(ValueError, match="no examples"):
        example_perplexity([], [])
    with pytest.raises(ValueError, match="2 NLL sums for 1 token counts"):
        example_perplexity([1.0, 2.0], [3])
    with pytest.raises(ValueError, match="EOS"):
        example_perplexity([1.0, 0.0], [3, 0])
    assert math.isfinite(example_perplexity([1e6], [1]))  # capped exponent


def test_sampled_names_and_sample_size():
    assert sampled({"dist_1": 0.5, "bleu_4": 0.1}, 256) == {"dist_1_sampled": 0.5, "bleu_4_sampled": 0.1,
                                                           "sample_size": 256}


def test_emotion_accuracy():
    assert emotion_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    assert emotion_accuracy(torch.tensor([5, 6]), np.array([5, 7])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 predictions for 2"):
        emotion_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no examples"):
        emotion_accuracy([], [])


def test_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat", equal lengths -> BP = 1.
    #   p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), p4 = 0
    #   BLEU-1 = 5/6, BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2), BLEU-3 = (1/8)^(1/3) = 1/2, BLEU-4 = 0.
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    b = bleu([hyp], [ref])
    assert b["bleu_1"] == pytest.approx(5 / 6)
    assert b["bleu_2"] == pytest.approx(math.sqrt(0.5))
    assert b["bleu_3"] == pytest.approx(0.5)
    assert b["bleu_4"] == 0.0


def test_bleu_brevity_penalty_and_clipping():
    # "the cat" vs 6-token ref: p1 = p2 = 1, c = 2 < r = 6 -> BP = exp(1 - 6/2) = e^-2.
    b = bleu([["the", "cat"]], ["the cat is on the mat".split()])
    assert b["bleu_1"] == pytest.approx(math.exp(-2))
    assert b["bleu_2"] == pytest.approx(math.exp(-2))
    assert b["bleu_3"] == 0.0
    # "the the the" vs "the cat": clipped p1 = 1/3, c = 3 > r = 2 -> BP = 1.
    assert bleu([["the"] * 3], [["the", "cat"]])["bleu_1"] == pytest.approx(1 / 3)


def test_bleu_matches_sacrebleu_on_a_random_corpus():
    rng = random.Random(0)
    words = "a b c d e f".split()
    hyps = [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(40)]
    refs = [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(40)]
    ours = bleu(hyps, refs)
    for n in range(1, 5):
        sb = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n)
        theirs = sb.corpus_score([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]]).score / 100
        assert ours[f"bleu_{n}"] == pytest.approx(theirs, abs=1e-9)


def test_confusion_matrix_rows_gold_columns_pred():
    m = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], num_classes=3)
    np.testing.assert_array_equal(m, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    assert confusion_matrix(torch.tensor([31]), torch.tensor([0])).shape == (32, 32)
    assert confusion_matrix([31], [0])[0, 31] == 1
    with pytest.raises(ValueError, match=r"pred ids must be in \[0, 3\)"):
        confusion_matrix([3], [0], num_classes=3)


def test_accumulator_combines_batches():
    acc = MetricAccumulator(num_classes=3)
    # Per-example NLL sums: ex1 2 ln 2 over 2 tokens (mean ln 2), ex2 12 ln 2 over 4 tokens (mean 3 ln 2).
    #   token-level: 14 ln 2 / 6 -> ppl_token 2^(7/3);  per example (papers): ppl exp(mean(ln 2, 3 ln 2)) = 4.
    acc.add(nll_sum=torch.tensor([2 * math.log(2)]), num_tokens=torch.tensor([2]),
            emotion_pred=torch.tensor([0]), emotion_gold=torch.tensor([0]),
            hypotheses=[RESPONSES[0]], references=[["i", "am", "sad"]])
    acc.add(nll_sum=torch.tensor([12 * math.log(2)]), num_tokens=torch.tensor([4]),
            emotion_pred=[1, 2], emotion_gold=[1, 1],
            hypotheses=RESPONSES[1:], references=[["i", "am", "glad"], ["so", "sad"]])
    out = acc.compute()
    assert out["loss"] == pytest.approx(14 * math.log(2) / 6)
    assert out["ppl_token"] == pytest.approx(2 ** (7 / 3))
    assert out["ppl"] == pytest.approx(4.0)
    assert out["acc"] == pytest.approx(2 / 3)
    assert out["dist_1"] == pytest.approx(5 / 8) and out["dist_2"] == pytest.approx(4 / 5)
    # hyps vs refs: unigram matches 3 + 2 + 2 = 7 of 8 tokens, equal lengths -> BLEU-1 = 7/8.
    assert out["bleu_1"] == pytest.approx(7 / 8)
    assert set(out) == {"loss", "ppl", "ppl_token", "acc", "dist_1", "dist_2", "dist_1_nltk", "dist_2_nltk",
                        "distinct_responses", "bleu_1", "bleu_2", "bleu_3", "bleu_4"}
    # nltk splits none of these tokens further: the reference's Dist equals ours here
    assert (out["dist_1_nltk"], out["dist_2_nltk"]) == (out["dist_1"], out["dist_2"])
    np.testing.assert_array_equal(acc.confusion(), [[1, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_accumulator_without_generation_has_no_dist_keys():
    acc = MetricAccumulator()
    acc.add(nll_sum=3.0, num_tokens=3, emotion_pred=[4], emotion_gold=[5])  # a scalar: one example
    out = acc.compute()
    assert out == {"loss": pytest.approx(1.0), "ppl": pytest.approx(math.e), "ppl_token": pytest.approx(math.e),
                   "acc": 0.0}
    with pytest.raises(ValueError, match="together"):
        acc.add(nll_sum=1.0)


# ---- Dist as the reference computes it (nltk words of the decoded text) ---------------------------

# Decoded outputs of our greedy decoder: spaCy tokens joined by spaces, one or several sentences.
DECODED = [
    "i am sorry to hear that .",
    "that is great ! i hope you have fun . what did you do ?",
    'i do n\'t know what to say , but it \'s " fine " ... do you want to talk about it ?',
    "i cannot wait ! that sounds like fun :) i wanna go too .",
]


def _word_tokenize_with_sentences(monkeypatch, text: str, pieces: list[str]) -> list[str]:
    """nltk's own word_tokenize on `text`, with punkt's sentence split (data we cannot download) replaced by
    `pieces`: word_tokenize is NLTKWordTokenizer over each sentence punkt finds."""
    import nltk.tokenize

    assert " ".join(pieces) == text
    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", lambda t, language="english": pieces)
    return nltk.tokenize.word_tokenize(text)


def _splits(tokens: list[str]):
    """Every sentence split punkt could choose: the whole text, each single split between two tokens, and a split
    after every sentence-final punctuation token."""
    yield [" ".join(tokens)]
    for i in range(1, len(tokens)):
        yield [" ".join(tokens[:i]), " ".join(tokens[i:])]
    cuts = [0] + [i + 1 for i, t in enumerate(tokens[:-1]) if t in {".", "!", "?"}] + [len(tokens)]
    yield [" ".join(tokens[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.mark.parametrize("text", DECODED)
def test_nltk_words_split_decoded_text_as_word_tokenize_does(monkeypatch, text):
    tokens = text.split(" ")
    ours = nltk_words(tokens)
    for pieces in _splits(tokens):
        assert _word_tokenize_with_sentences(monkeypatch, text, pieces) == ours, pieces
    if ":)" in tokens:  # where nltk's words are not our tokens
        assert ours[ours.index("can"):ours.index("can") + 2] == ["can", "not"] and ":)" not in ours


def test_nltk_words_differ_from_word_tokenize_only_after_an_abbreviation_ending_a_sentence(monkeypatch):
    """The documented exception: a sentence ending in a token with its own period ("p.m.") loses the period to
    word_tokenize; nltk_words keeps the token whole mid-text and splits it only at the very end, as both do."""
    tokens = "see you at 5 p.m. i will be there".split(" ")
    ours = nltk_words(tokens)
    assert "p.m." in ours
    split_after = [" ".join(tokens[:5]), " ".join(tokens[5:])]
    theirs = _word_tokenize_with_sentences(monkeypatch, " ".join(tokens), split_after)
    assert theirs[4:6] == ["p.m", "."] and theirs[:4] + theirs[6:] == ours[:4] + ours[5:]
    assert nltk_words(tokens[:5])[-2:] == ["p.m", "."]  # at the end of the response: split by both


def test_dist_nltk_counts_nltk_words():
    # ours: "i cannot wait :)" + "i can not wait" -> 8 tokens, unique {i, cannot, wait, :), can, not} = 6
    # nltk: "i can not wait : )" + "i can not wait" -> 10 words, unique {i, can, not, wait, :, )} = 6;
    #   bigrams: 5 + 3 = 8, unique {i can, can not, not wait, wait :, : )} = 5 (ours: 3 + 3, all unique)
    acc = MetricAccumulator()
    acc.add(hypotheses=[["i", "cannot", "wait", ":)"], ["i", "can", "not", "wait"]])
    out = acc.compute()
    assert out["dist_1"] == pytest.approx(6 / 8) and out["dist_1_nltk"] == pytest.approx(6 / 10)
    assert out["dist_2"] == pytest.approx(1.0) and out["dist_2_nltk"] == pytest.approx(5 / 8)


def test_distinct_responses_is_the_share_of_distinct_token_sequences():
    acc = MetricAccumulator()
    acc.add(hypotheses=[["that", "is", "great"], ["i", "am", "sorry"], ["that", "is", "great"], ["that", "is"]])
    assert acc.compute()["distinct_responses"] == pytest.approx(3 / 4)
