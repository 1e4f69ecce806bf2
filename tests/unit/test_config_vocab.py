"""Typed config (YAML + CLI overrides, errors naming the field) and the vocabulary artifact."""

from __future__ import annotations

import pytest

from trainers.config import ConfigError, DataConfig, InferenceConfig, TrainConfig, load_config, parse_overrides
from trainers.data.emotions import EMOTIONS
from trainers.data.records import DataError
from trainers.data.vocab import Vocab
from trainers.tokens import EOS, PAD, SPECIALS, UNK


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("source: /data/ed\nmin_freq: 3\n")
    cfg = load_config(DataConfig, path, ["min_freq=5", "knowledge=precomputed"])
    assert (cfg.source, cfg.min_freq, cfg.knowledge) == ("/data/ed", 5, "precomputed")
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


@pytest.mark.parametrize("override, field", [
    ("min_freq=0", "min_freq"), ("knowledge=conceptnet", "knowledge"), ("min_frq=2", "min_frq"),
    ("splits=[valid]", "splits"), ("n_process=lots", "n_process"),
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, None, [override])
    assert f"  {field}" in str(err.value)


def test_bad_override_syntax_and_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DataConfig, None, ["min_freq"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DataConfig, tmp_path / "list.yaml")


def test_vocab_keeps_specials_and_emotions_and_round_trips(tmp_path):
    vocab = Vocab.build([["i", "am", "happy", "happy"], ["am", "i", "?"]], min_freq=2)
    assert tuple(vocab.itos[: len(SPECIALS)]) == SPECIALS
    assert all(e in vocab for e in EMOTIONS)           # present even though never seen
    assert "happy" in vocab and "?" not in vocab         # min_freq cut-off
    assert vocab.encode(["happy", "zebra"]) == [vocab.stoi["happy"], UNK]
    assert vocab.decode([vocab.stoi["am"], EOS, vocab.stoi["i"]]) == ["am"]
    assert vocab.decode([PAD, vocab.stoi["i"]], stop_at_eos=False) == ["i"]
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").itos == vocab.itos
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not an edp vocabulary"):
        Vocab.load(tmp_path / "bad.json")


def test_inference_config_reads_its_part_of_a_run_config():
    run = TrainConfig(model="iamm", max_context=64, bf16=False, decode={"max_len": 5}, batch_size=3)
    cfg = InferenceConfig.of_run(run.model_dump())
    assert (cfg.model, cfg.max_context, cfg.bf16, cfg.decode_config().max_len) == ("iamm", 64, False, 5)
    assert cfg.data == run.data
