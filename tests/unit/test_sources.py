"""Loaders: jsonl, official CSV (dir and tar.gz), strict validation and --skip-invalid."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from trainers.data.records import DataError, examples_from
from trainers.data.sources import load_splits

GOOD = {"conv_id": "c1", "emotion": "proud", "situation": "My kid won a prize.",
        "utterances": ["My kid won the spelling bee!", "That is wonderful, you must be proud.", "I am."],
        "speakers": ["speaker", "listener", "speaker"]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def csv_text(conversations, header=True):
    """The official release layout: one row per utterance, commas escaped as _comma_."""
    lines = ["conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"] if header else []
    for c in conversations:
        for k, u in enumerate(c["utterances"]):
            worker = "1" if k % 2 == 0 else "2"
            lines.append(",".join([c["conv_id"], str(k + 1), c["emotion"], c["situation"].replace(",", "_comma_"),
                                   worker, u.replace(",", "_comma_"), "5|5|5_2|2|5", ""]))
    return "\n".join(lines) + "\n"


def test_embedded_sample_covers_all_emotions(sample_dir):
    from trainers.data.emotions import EMOTIONS

    reports = load_splits(sample_dir)
    assert set(reports) == {"train", "valid"}
    train = reports["train"].conversations
    assert len(train) >= 64 and {c.emotion for c in train} == set(EMOTIONS)
    assert not reports["train"].invalid and not reports["valid"].invalid


def test_jsonl_and_csv_and_targz_give_the_same_records(tmp_path):
    other = dict(GOOD, conv_id="c2", emotion="sad", situation="Lost my keys, again.",
                 utterances=["I lost my keys, again.", "Oh no, where did you last see them?"],
                 speakers=["speaker", "listener"])
    write_jsonl(tmp_path / "ed_train.jsonl", [GOOD, other])
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "train.csv").write_text(csv_text([GOOD, other]))
    tar_path = tmp_path / "empatheticdialogues.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        data = csv_text([GOOD, other]).encode()
        info = tarfile.TarInfo("empatheticdialogues/train.csv")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    a = load_splits(tmp_path / "ed_train.jsonl")["train"].conversations
    b = load_splits(csv_dir)["train"].conversations
    c = load_splits(tar_path)["train"].conversations
    assert a == b == c
    assert a[1].situation == "Lost my keys, again."  # _comma_ unescaped
    assert [e.turn for e in examples_from(a)] == [1, 1]


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r.pop("emotion"), "missing field 'emotion'"),
    (lambda r: r.update(emotion="hangry"), "bad emotion label 'hangry'"),
    (lambda r: r.update(speakers=["speaker", "speaker", "listener"]), "broken turn order"),
    (lambda r: r.update(utterances=["a", "", "c"]), "'utterances[1]' is empty"),
    (lambda r: r.update(situation=7), "'situation' is a int"),
    (lambda r: r.update(speakers=["speaker"]), "as long as 'utterances'"),
])
def test_invalid_jsonl_record_is_reported_with_conv_id_and_reason(tmp_path, mutate, reason):
    bad = json.loads(json.dumps(GOOD))
    bad["conv_id"] = "broken:1"
    mutate(bad)
    write_jsonl(tmp_path / "ed_train.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        load_splits(tmp_path)
    assert "broken:1" in str(err.value) and reason in str(err.value) and "--skip-invalid" in str(err.value)
    report = load_splits(tmp_path, skip_invalid=True)["train"]
    assert [c.conv_id for c in report.conversations] == ["c1"]
    assert len(report.invalid) == 1 and report.invalid[0].conv_id == "broken:1"


def test_bad_json_bad_encoding_and_duplicates_are_counted(tmp_path):
    raw = (json.dumps(GOOD) + "\n" + '{"conv_id": "trunc:1", "emotion": \n'
           + json.dumps(GOOD) + "\n").encode() + b'{"conv_id": "enc:1", "x": "\xff\xfe"}\n'
    (tmp_path / "ed_train.jsonl").write_bytes(raw)
    report = load_splits(tmp_path, skip_invalid=True)["train"]
    reasons = {r.conv_id: r.reason for r in report.invalid}
    assert len(report.conversations) == 1
    assert "malformed JSON" in reasons["trunc:1"]
    assert "bad encoding" in reasons["enc:1"]
    assert reasons["c1"] == "duplicate conv_id"


def test_csv_broken_order_and_short_rows(tmp_path):
    text = csv_text([GOOD]).replace("c1,2,proud", "c1,3,proud")
    text += "c9,1,sad,only two cols\n"
    (tmp_path / "train.csv").write_text(text)
    report = load_splits(tmp_path, skip_invalid=True)["train"]
    reasons = {r.conv_id: r.reason for r in report.invalid}
    assert "utterance_idx '3', expected 2" in reasons["c1"]
    assert "columns" in reasons["c9"]


def test_missing_source_and_split_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nope")
    write_jsonl(tmp_path / "ed_train.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"no \['valid'\] split"):
        load_splits(tmp_path, splits=["train", "valid"])


@pytest.mark.fulldata
def test_full_ed_example_counts(ed_data_dir):
    reports = load_splits(ed_data_dir, splits=["train", "valid"])
    assert len(examples_from(reports["train"].conversations)) == 40252
    assert len(examples_from(reports["valid"].conversations)) == 5736
    assert len(reports["train"].conversations) == 19532 and not reports["train"].invalid
