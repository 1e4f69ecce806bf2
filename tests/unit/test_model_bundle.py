"""The serving bundle: a trained model round-trips through safetensors + JSON; pickles are never loaded."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests.integration.registry_models import train_tiny
from trainers.evaluate import export_bundle, load_checkpoint
from trainers.inference import Request, Responder
from trainers.model_bundle import CONFIG, VOCAB, WEIGHTS, BundleError, find_bundle, load_bundle


class WritesAMarker:
    """Unpickling this creates a file: the proof that a loader ran code from a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def checkpoint(prepared_sample, tmp_path_factory):
    return train_tiny(prepared_sample, tmp_path_factory.mktemp("bundle-escm"), max_steps=2)[0]


def test_bundle_round_trips_weights_config_vocab_and_answers(checkpoint, tmp_path, prepared_sample):
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == [CONFIG, WEIGHTS, VOCAB]
    config = json.loads((bundle / CONFIG).read_text())
    assert config["model_name"] == "escm" and config["data_key"] == prepared_sample.manifest["key"]
    config, model, vocab = load_bundle(bundle)
    ref_cfg, ref_model, ref_vocab = load_checkpoint(checkpoint)
    assert config == ref_cfg.model_dump(mode="json") and vocab.itos == ref_vocab.itos
    ref = ref_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
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
        load_bundle(tmp_path)
    assert not marker.exists()


def test_mismatched_weights_and_bad_config_name_the_file(checkpoint, tmp_path):
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    config = json.loads((bundle / CONFIG).read_text())
    (bundle / CONFIG).write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(BundleError, match="config.json is not an edp bundle"):
        load_bundle(bundle)
    config["model_config"]["d_model"] = 2 * config["model_config"]["d_model"]
    (bundle / CONFIG).write_text(json.dumps(config))
    with pytest.raises(BundleError, match="model.safetensors does not match"):
        load_bundle(bundle)
