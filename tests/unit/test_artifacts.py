"""trainers.artifacts: the training checkpoint (format, atomic save, pruning, reading), the serving bundle (a trained
model round-trips through safetensors + JSON; pickles are never loaded) and the one `load`."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests.integration.registry_models import train_tiny
from trainers import artifacts
from trainers.artifacts import CONFIG, VOCAB, WEIGHTS, BundleError, export_bundle, find_bundle, load
from trainers.data.records import DataError
from trainers.inference import Request, Responder


class WritesAMarker:
    """Unpickling this creates a file: the proof that a loader ran code from a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_save_is_atomic_and_prune_keeps_the_newest_step_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        path = artifacts.save_checkpoint({"format": artifacts.CHECKPOINT_FORMAT, "step": step},
                                         artifacts.step_path(d, step))
    artifacts.save_checkpoint({"format": artifacts.CHECKPOINT_FORMAT, "step": 4}, d / "best.pt")
    assert path.name == "step_00000006.pt" and not list(d.glob("*.tmp"))
    artifacts.prune(d, keep=2)
    assert [p.name for p in artifacts.step_checkpoints(d)] == ["step_00000004.pt", "step_00000006.pt"]
    assert (d / "best.pt").exists() and artifacts.read_checkpoint(d / "best.pt")["step"] == 4


def test_load_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        artifacts.read_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not an edp checkpoint"):
        artifacts.read_checkpoint(tmp_path / "other.pt")


def test_trainers_source_hash_is_stable():
    digest = artifacts.trainers_source_hash()
    assert digest == artifacts.trainers_source_hash() and len(digest) == 16


@pytest.fixture(scope="module")
def checkpoint(prepared_sample, tmp_path_factory):
    return train_tiny(prepared_sample, tmp_path_factory.mktemp("bundle-escm"), max_steps=2)[0]


def test_bundle_round_trips_weights_config_vocab_and_answers(checkpoint, tmp_path, prepared_sample):
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == [CONFIG, WEIGHTS, VOCAB]
    config = json.loads((bundle / CONFIG).read_text())
    assert config["model_name"] == "escm" and config["data_key"] == prepared_sample.manifest["key"]
    loaded, ref = load(bundle), load(checkpoint)
    assert loaded.run_config == ref.train_config().model_dump(mode="json") and loaded.vocab.itos == ref.vocab.itos
    assert loaded.data_key == ref.data_key == prepared_sample.manifest["key"]
    ref_state = ref.model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in loaded.model.state_dict().items())
    assert (bundle / WEIGHTS).stat().st_size < checkpoint.stat().st_size  # no optimizer / RNG state
    (answer,) = Responder.from_bundle(bundle).respond([Request(["I lost my keys again."])])
    assert isinstance(answer.response, str) and answer.emotion


def test_find_bundle_takes_the_shallowest(checkpoint, tmp_path):
    export_bundle(checkpoint, tmp_path / "model" / "artifacts" / "bundle")
    assert find_bundle(tmp_path) == tmp_path / "model" / "artifacts" / "bundle"
    assert find_bundle(tmp_path / "model" / "artifacts" / "bundle" / "..") is not None
    assert find_bundle(tmp_path / "elsewhere") is None


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps(WritesAMarker(marker)))
    with pytest.raises(BundleError, match=r"not a serving bundle.*never loaded.*checkpoint\.pt"):
        load(tmp_path)
    with pytest.raises(BundleError, match="not a serving bundle"):
        load(tmp_path / "checkpoint.pt", bundle_only=True)
    assert not marker.exists()


def test_mismatched_weights_and_bad_config_name_the_file(checkpoint, tmp_path):
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    config = json.loads((bundle / CONFIG).read_text())
    (bundle / CONFIG).write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(BundleError, match="config.json is not an edp bundle"):
        load(bundle)
    config["model_config"]["d_model"] = 2 * config["model_config"]["d_model"]
    (bundle / CONFIG).write_text(json.dumps(config))
    with pytest.raises(BundleError, match="model.safetensors does not match"):
        load(bundle)


def test_load_refuses_a_registry_uri_naming_where_it_is_resolved():
    with pytest.raises(DataError, match="registry URI: resolve it through the registry first"):
        load("models:/escm@champion")
