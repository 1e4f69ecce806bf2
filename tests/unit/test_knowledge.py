"""KnowledgeSource backends: none, precomputed jsonl, and comet on a tiny random seq2seq model."""

from __future__ import annotations

import json
import sys
import types

import pytest

from trainers.data.knowledge import (
    RELATIONS,
    CometKnowledge,
    NoKnowledge,
    PrecomputedKnowledge,
    build_knowledge,
    clean_inferences,
    records_from_iamm_split,
    write_precomputed,
)
from trainers.data.records import DataError


def _record(text: str, tag: str) -> dict:
    return {"text": text, **{rel: [f"{tag} {rel.lower()} 1", f"{tag} {rel.lower()} 2"] for rel in RELATIONS}}


# ----------------------------------------------------------------------------------------------- none


def test_none_backend_is_unavailable_and_empty():
    ks = build_knowledge("none")
    assert isinstance(ks, NoKnowledge) and ks.available is False
    out = ks.infer(["My dog died.", "I won!"])
    assert len(out) == 2
    for inf in out:
        assert list(inf) == list(RELATIONS)
        assert all(v == [] for v in inf.values())
    desc = ks.describe()
    assert desc["backend"] == "none" and desc["available"] is False
    assert "w/o IA" in desc["note"]


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="none, precomputed, comet"):
        build_knowledge("atomic")


# ----------------------------------------------------------------------------------------- precomputed


def test_precomputed_round_trip(tmp_path):
    records = [_record("My dog died.", "a"), _record("I won a prize", "b")]
    path = write_precomputed(records, tmp_path / "k.jsonl")
    ks = build_knowledge("precomputed", path=path)
    assert ks.available is True
    out = ks.infer(["I won a prize", "My dog died."])
    assert out[0]["xReact"] == ["b xreact 1", "b xreact 2"]
    assert out[1]["xIntent"] == ["a xintent 1", "a xintent 2"]
    assert list(out[0]) == list(RELATIONS)
    out[0]["xReact"].append("mutated")  # callers get copies, the table is untouched
    assert ks.infer(["I won a prize"])[0]["xReact"] == ["b xreact 1", "b xreact 2"]
    desc = ks.describe()
    assert desc["entries"] == 2 and len(desc["sha256"]) == 64 and desc["missing"] == 0


def test_precomputed_normalises_lookup_keys(tmp_path):
    path = write_precomputed([_record("  My   DOG\tdied. ", "a")], tmp_path / "k.jsonl")
    ks = PrecomputedKnowledge(path)
    assert ks.infer(["my dog died."])[0]["xNeed"] == ["a xneed 1", "a xneed 2"]
    assert ks.infer(["MY DOG  DIED.\n"])[0]["xNeed"] == ["a xneed 1", "a xneed 2"]


def test_precomputed_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(_record("a", "a")) + "\n\n" + '{"text": "b", "xIntent": [}\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        PrecomputedKnowledge(path)


def test_precomputed_missing_relation_is_an_error(tmp_path):
    bad = _record("a", "a")
    del bad["xWant"]
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(_record("b", "b")) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"k.jsonl:2: missing relation 'xWant'"):
        PrecomputedKnowledge(path)


def test_precomputed_rejects_non_list_values_and_conflicting_duplicates(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({**_record("a", "a"), "xReact": "sad"}) + "\n")
    with pytest.raises(DataError, match=r"k.jsonl:1: relation 'xReact' is a str"):
        PrecomputedKnowledge(path)
    lines = [json.dumps(_record("Same text", "a")), json.dumps(_record("same  TEXT", "b"))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"k.jsonl:2: .* different inferences at line 1"):
        PrecomputedKnowledge(path)


def test_precomputed_missing_text_error_vs_empty(tmp_path):
    path = write_precomputed([_record("known", "k")], tmp_path / "k.jsonl")
    long_text = "an unseen utterance that is quite a bit longer than sixty characters in total"
    with pytest.raises(DataError, match=r"2 text\(s\) have no knowledge entry") as err:
        PrecomputedKnowledge(path).infer(["known", long_text, "also unseen", long_text])
    assert repr(long_text[:60]) in str(err.value) and long_text not in str(err.value)

    ks = PrecomputedKnowledge(path, on_missing="empty")
    out = ks.infer(["known", long_text, "also unseen", long_text])
    assert out[0]["xEffect"] == ["k xeffect 1", "k xeffect 2"]
    assert all(v == [] for inf in out[1:] for v in inf.values())
    assert ks.missing == 2  # distinct texts
    assert ks.describe()["missing"] == 2


def test_iamm_shipped_split_converts_to_precomputed(tmp_path):
    beams = [[["to", "go"], ["to", "rest"]] for _ in RELATIONS]
    split = {
        "context": [[["i", "am", "tired"]], [["i", "am", "tired"], ["why", "?"], ["work", "."]]],
        "situation": [["long", "day"], ["long", "day"]],
        "comet_cxt": [[beams], [beams, beams, beams]],
        "comet_sit": [beams, beams],
    }
    records = records_from_iamm_split(split)
    assert [r["text"] for r in records] == ["i am tired", "long day", "why ?", "work ."]
    ks = PrecomputedKnowledge(write_precomputed(records, tmp_path / "iamm.jsonl"))
    assert ks.infer(["I am  tired"])[0]["xWant"] == ["to go", "to rest"]


# ----------------------------------------------------------------------------------------------- comet

WORDS = [*RELATIONS, "[GEN]", "none", "i", "am", "happy", "sad", "to", "be", "my", "dog", "died", "friend",
         "won", "a", "prize", "the", "cat", "feels", "wants", "go", "home"]


def _tiny_checkpoint(directory, seed: int = 0):
    """A randomly initialised 1-layer BART (d_model=16) and a WordLevel tokenizer, saved locally."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
    )
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return _tiny_checkpoint(tmp_path_factory.mktemp("comet"))


TEXTS = ["my dog died", "i won a prize", "the cat feels sad"]


def test_comet_returns_five_relations_of_strings_in_batches(checkpoint, monkeypatch):
    ks = build_knowledge(
        "comet", checkpoint=checkpoint, batch_size=8, num_beams=3, num_return=3, max_new_tokens=6
    )
    batch_sizes = []
    generate = ks.model.generate

    def spy(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(ks.model, "generate", spy)
    out = ks.infer(TEXTS + ["my  dog died"])  # the repeat goes through the model once
    assert batch_sizes == [8, 7]  # 3 distinct texts x 5 relations, in batches of 8
    assert len(out) == 4 and out[3] == out[0]
    for inf in out:
        assert list(inf) == list(RELATIONS)
        for values in inf.values():
            assert isinstance(values, list) and len(values) <= 3
            assert all(isinstance(v, str) and v.strip() and v.lower() != "none" for v in values)
            assert len(set(values)) == len(values)
    assert any(v for inf in out for v in inf.values()), "a random model should emit some tokens"
    ks.infer(TEXTS)  # cached: no further generate calls
    assert batch_sizes == [8, 7]
    desc = ks.describe()
    assert desc["backend"] == "comet" and desc["num_beams"] == 3 and desc["query_template"].endswith("[GEN]")


def test_comet_is_deterministic_for_a_fixed_seed(checkpoint, tmp_path):
    settings = dict(batch_size=4, num_beams=2, num_return=2, max_new_tokens=5)
    first = CometKnowledge(checkpoint, **settings).infer(TEXTS)
    again = CometKnowledge(_tiny_checkpoint(tmp_path / "same_seed", seed=0), **settings).infer(TEXTS)
    assert first == again


def test_comet_s3_checkpoint_is_fetched_lazily(checkpoint, monkeypatch, tmp_path):
    calls = []

    def fetch_s3_prefix(uri, cache_dir, *, endpoint_url=None):
        calls.append((uri, str(cache_dir), endpoint_url))
        return checkpoint

    fake_remote = types.SimpleNamespace(fetch_s3_prefix=fetch_s3_prefix)
    monkeypatch.setitem(sys.modules, "trainers.data.remote", fake_remote)
    ks = CometKnowledge("s3://models/comet", cache_dir=tmp_path, endpoint_url="http://127.0.0.1:9")
    assert calls == [("s3://models/comet", str(tmp_path), "http://127.0.0.1:9")]
    assert ks.local_path == checkpoint and ks.describe()["checkpoint"] == "s3://models/comet"


def test_comet_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(DataError, match=r"pip install \.\[comet\]"):
        CometKnowledge(tmp_path)


def test_comet_validates_settings_and_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="num_return"):
        CometKnowledge(tmp_path, num_beams=2, num_return=3)
    with pytest.raises(ValueError, match="batch_size"):
        CometKnowledge(tmp_path, batch_size=0)
    with pytest.raises(DataError, match="not a directory"):
        CometKnowledge(tmp_path / "absent")


def test_clean_inferences_strips_drops_none_and_dedups():
    outputs = [" to eat ", "none", "", "None ", "to  eat", "to sleep"]
    assert clean_inferences(outputs) == ["to eat", "to sleep"]
