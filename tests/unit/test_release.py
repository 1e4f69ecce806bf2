"""trainers.release and `edp models`: a tiny model released with its card (float32 and float16), verified, listed,
evaluated back to the card's exact metrics, served from its directory by a plain-Python Replica, and its
registry tags."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from cluster.cli import app
from cluster.console import released_table
from cluster.tracking.releases import run_params, version_tags
from services.registry import RegistryError, local_version
from services.replica import CHAMPION, Replica, RolloutConfig, StaticSource
from tests.integration.registry_models import train_tiny
from trainers import artifacts, release
from trainers.inference import Request

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(prepared_sample, tmp_path_factory, one_thread):
    return train_tiny(prepared_sample, tmp_path_factory.mktemp("release-ckpt"), max_steps=2)[0]


@pytest.fixture(scope="module")
def released(checkpoint, sample_dir, tmp_path_factory):
    """A float32 release of the tiny model, evaluated on the sample's valid split, through `edp models release`."""
    out = tmp_path_factory.mktemp("models") / "escm-tiny"
    result = runner.invoke(app, ["models", "release", str(checkpoint), "--out", str(out), "--data", str(sample_dir),
                                 "--split", "valid", "--train-command", "python -m trainers.train --model escm",
                                 "--commit", "0123456789abcdef"])
    assert result.exit_code == 0, result.output
    return out


def test_release_writes_the_bundle_and_a_card_rendered_from_card_json(released, checkpoint):
    assert sorted(p.name for p in released.iterdir()) == sorted([*release.BUNDLE_FILES, "card.json", "card.md"])
    assert release.BUNDLE_FILES == (artifacts.WEIGHTS, artifacts.CONFIG, artifacts.VOCAB)
    card = release.read_card(released)
    assert (released / "card.md").read_text() == release.render_card(card)
    assert card["name"] == "escm-tiny" and card["model"]["type"] == "escm"
    assert card["model"]["params"] == sum(p.numel() for p in artifacts.load(checkpoint).model.parameters())
    assert card["training"]["command"] == "python -m trainers.train --model escm"
    assert card["training"]["commit"] == "0123456789abcdef"
    assert card["training"]["step"] == artifacts.read_checkpoint(checkpoint)["step"]
    assert card["evaluation"]["dtype"] == {"weights": "float32", "compute": "float32"}
    assert set(card["evaluation"]["metrics"]) >= {"acc", "ppl", "ppl_token", "dist_1", "dist_2"}
    assert len(card["samples"]) == release.SAMPLE_COUNT and all(s["context"] and s["generated"]
                                                                 for s in card["samples"])
    text = (released / "card.md").read_text()
    for needed in ("CC BY-NC 4.0", "Rashkin", "not for crisis support", "English only", "0123456789abcdef",
                   card["samples"][0]["generated"], repr(card["evaluation"]["metrics"]["ppl"])):
        assert needed in text
    assert release.verify(released) == []


def test_evaluate_model_dir_reproduces_the_cards_metrics_exactly(released, sample_dir, tmp_path):
    result = runner.invoke(app, ["evaluate", "--model", str(released), "--data", str(sample_dir),
                                 "--split", "valid", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "weights float32, computed in float32" in result.output.replace("\n", " ")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"] == release.read_card(released)["evaluation"]["metrics"]
    assert "escm-tiny" in metrics["checkpoint"]


def test_a_tampered_file_is_named_by_verify_list_evaluate_and_serve(released, tmp_path, sample_dir):
    copy = tmp_path / "models" / "escm-tiny"
    copy.parent.mkdir()
    for f in released.iterdir():
        (copy / f.name).parent.mkdir(exist_ok=True)
        (copy / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((copy / "vocab.json").read_text())
    (copy / "vocab.json").write_text(json.dumps(vocab) + " ")
    assert [p.split(":")[0] for p in release.verify(copy)] == ["vocab.json"]
    result = runner.invoke(app, ["models", "verify", str(copy)])
    assert result.exit_code == 1 and "vocab.json" in result.output
    result = runner.invoke(app, ["models", "list", "--dir", str(copy.parent)])
    assert result.exit_code == 1 and "escm-tiny" in result.output and "vocab.json" in result.output
    result = runner.invoke(app, ["evaluate", "--model", str(copy), "--data", str(sample_dir)])
    assert result.exit_code == 2 and "vocab.json" in result.output
    with pytest.raises(RegistryError, match="vocab.json"):
        local_version(copy)


def test_list_shows_the_cards_figures_and_an_empty_folder_says_so(released, tmp_path):
    result = runner.invoke(app, ["models", "list", "--dir", str(released.parent)])
    assert result.exit_code == 0, result.output
    rec = Console(record=True, width=250)
    rec.print(released_table(release.released_models(released.parent), released.parent))
    text, card = rec.export_text(), release.read_card(released)
    assert "escm-tiny" in text and "verified" in text and "0123456789" in text and "float32" in text
    assert f"{card['evaluation']['metrics']['ppl']:.2f}" in text and f"{card['model']['params']:,}" in text
    assert f"{card['evaluation']['metrics']['acc'] * 100:.2f}" in text
    for empty in (tmp_path, tmp_path / "missing"):
        result = runner.invoke(app, ["models", "list", "--dir", str(empty)])
        assert result.exit_code == 0 and "no released models" in result.output


def test_a_directory_that_is_not_a_bundle_is_refused(tmp_path, sample_dir):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="not a bundle directory"):
        local_version(tmp_path)
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path), "--data", str(sample_dir)])
    assert result.exit_code == 2 and "not a bundle directory" in result.output
    result = runner.invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not a bundle directory" in result.output


def test_fp16_release_halves_the_weights_loads_in_float32_and_records_both_evaluations(checkpoint, sample_dir,
                                                                                         tmp_path, released):
    card = release.release(checkpoint, tmp_path / "escm-fp16", fp16=True, source=str(sample_dir), log=lambda s: None)
    out = tmp_path / "escm-fp16"
    size16, size32 = (out / artifacts.WEIGHTS).stat().st_size, (released / artifacts.WEIGHTS).stat().st_size
    assert size16 < 0.6 * size32
    loaded, ref = artifacts.load(out), artifacts.load(checkpoint)
    assert loaded.weights_dtype == "float16" and card["model"]["weights_dtype"] == "float16"
    state, ref_state = loaded.model.state_dict(), ref.model.state_dict()
    assert all(v.dtype == ref_state[k].dtype for k, v in state.items())  # float32 again in memory
    assert all(torch.equal(v, ref_state[k].half().to(v.dtype)) for k, v in state.items() if v.is_floating_point())
    check = card["precision_check"]
    assert check["weights"] == "float16" and check["released"] == card["evaluation"]["metrics"]
    assert check["float32"] == release.read_card(released)["evaluation"]["metrics"]
    assert card["evaluation"]["dtype"]["weights"] == "float16"


def test_precision_moves_names_each_metric_beyond_the_tolerance_in_table_units():
    fp32 = {"acc": 0.400, "ppl": 35.00, "ppl_token": 30.0, "dist_1": 0.0100, "dist_2": 0.030, "bleu_1": 0.2}
    fp16 = {"acc": 0.4005, "ppl": 35.05, "ppl_token": 30.2, "dist_1": 0.0115, "dist_2": 0.030, "bleu_1": 0.9}
    moves = release.precision_moves(fp32, fp16)
    assert set(moves) == {"ppl_token", "dist_1"}  # acc moved 0.05 points, ppl 0.05: within 0.1; BLEU is not gated
    assert moves["dist_1"] == pytest.approx(0.15)


def test_an_fp16_release_whose_metrics_move_is_refused_and_writes_nothing(checkpoint, sample_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(release, "precision_moves", lambda a, b, tolerance=0.1: {"acc": 1.5})
    moved = r"float16 weights move acc by 1\.500 \(float32 [0-9.]+, float16 [0-9.]+\)"
    with pytest.raises(release.ReleaseError, match=moved):
        release.release(checkpoint, tmp_path / "m", fp16=True, source=str(sample_dir), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_over_the_limit_is_refused_naming_size_limit_and_fp16(checkpoint, tmp_path):
    with pytest.raises(release.ReleaseError, match=r"over the 0 MB limit.*--fp16"):
        release.release(checkpoint, tmp_path / "big", limit=1000, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(app, ["models", "release", str(checkpoint), "--out", str(tmp_path / "big")])
    assert result.exit_code == 0 and "no --data" in result.output  # the tiny model fits the real limit
    with pytest.raises(release.ReleaseError, match="already exists"):
        release.release(checkpoint, tmp_path / "big", log=lambda s: None)


def test_a_replica_serves_the_directory_as_one_fixed_version_without_a_registry(released):
    """The static source: lookup always names local:<sha12>, the poller's refresh keeps it, a request answers."""
    source = StaticSource(str(released), warm_up=False)
    card = release.read_card(released)
    assert (source.version.name, source.version.version) == ("escm-tiny", f"local:{card['bundle_sha256'][:12]}")
    loads = []
    load = lambda mv, alias: loads.append(mv) or source.load(mv, alias)  # noqa: E731
    calls = []
    metrics = type("Metrics", (), {"__getattr__": lambda self, n: lambda *a: calls.append((n, *a))})()

    async def queue(request):
        (result,) = await replica.generate(CHAMPION, [request])
        return result

    replica = Replica("escm-tiny", "champion", 3600, lookup=source.lookup, load=load, metrics=metrics,
                      queues={CHAMPION: queue})
    replica.retarget(RolloutConfig())
    replica.refresh()  # what the poll loop does: the same version, nothing reloaded
    assert len(loads) == 1 and replica.slots[CHAMPION].loaded.version == source.version.version
    routed = asyncio.run(replica.answer(Request(["I lost my keys again."]), "client"))
    assert isinstance(routed.answer.response, str) and routed.loaded.info().name == "escm-tiny"
    status = replica.status(32, 0.05)
    assert status.source == f"release:{released.resolve()}" and status.version.startswith("local:")
    assert released.exists() and release.verify(released) == []  # served in place, never discarded


def test_version_tags_carry_the_cards_metrics_source_and_sha(released):
    card = release.read_card(released)
    tags = version_tags(card, "models/escm-tiny")
    metrics = card["evaluation"]["metrics"]
    assert tags["valid_acc"] == repr(float(metrics["acc"])) and tags["valid_dist_1"] == repr(float(metrics["dist_1"]))
    assert tags["metric.valid_ppl"] == tags["valid_ppl"] == tags["metric.final_valid_ppl"]
    assert tags["source"] == "release:models/escm-tiny" and tags["bundle_sha256"] == card["bundle_sha256"]
    assert tags["code.git_commit"] == "0123456789abcdef" and tags["eval.split"] == "valid"
    assert tags["data.key"] == card["data"]["data_key"] and tags["metric_definition"].startswith("papers")
    assert all(isinstance(v, str) and len(v) <= 5000 for v in tags.values())
    params = run_params(card)
    assert params["model"] == "escm" and params["data.key"] == tags["data.key"] and "valid_acc" not in params
    no_eval = version_tags({**card, "evaluation": None}, "d")
    assert "valid_acc" not in no_eval and "eval.split" not in no_eval


def test_serve_model_dir_deploys_the_app_of_its_model_type_with_the_directory_and_no_tracking_uri(released,
                                                                                                  monkeypatch):
    """`edp serve --model DIR`: the Serve config's app for the bundle's model type, args naming the directory and
    the card's name (no MLflow URI resolved); Ray itself is not started here."""
    from cluster.local import serve as serve_local

    specs = []

    def run(spec, **kwargs):
        specs.append(spec)
        raise KeyboardInterrupt  # stop before the command waits for Ctrl-C

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(serve_local, "run", run)
    runner.invoke(app, ["serve", "--model", str(released)])
    (spec,) = specs
    assert spec.app_name == "escm" and spec.route_prefix == "/escm"
    assert spec.args["model_dir"] == str(released.resolve()) and spec.args["model_name"] == "escm-tiny"
    assert not spec.args.get("mlflow_tracking_uri")


def test_int8_release_is_checked_against_float32_and_its_card_and_list_show_the_format(checkpoint, sample_dir,
                                                                                      tmp_path, released,
                                                                                      monkeypatch):
    """A low threshold, so that the tiny model's embedding and output projection are int8; a wider tolerance, as
    int8 moves the barely trained tiny model's PPL (about 850) by about 0.3."""
    from trainers import quantize

    monkeypatch.setattr(quantize, "MIN_ELEMENTS", 4000)
    monkeypatch.setattr(release, "PRECISION_TOLERANCE", 5.0)
    out = tmp_path / "models" / "escm-int8"
    result = runner.invoke(app, ["models", "release", str(checkpoint), "--out", str(out), "--quantize", "int8",
                                 "--data", str(sample_dir)])
    assert result.exit_code == 0, result.output
    card, loaded = release.read_card(out), artifacts.load(out)
    assert loaded.weights_dtype == card["model"]["weights_dtype"] == release.INT8_FORMAT == artifacts.INT8
    assert card["evaluation"]["dtype"]["weights"] == "int8-rowcol+fp16"
    check = card["precision_check"]
    assert check["weights"] == "int8-rowcol+fp16" and check["released"] == card["evaluation"]["metrics"]
    assert check["tolerance"] == 5.0 and check["released"]["ppl"] != check["float32"]["ppl"]
    assert check["float32"] == release.read_card(released)["evaluation"]["metrics"]
    assert not release.precision_moves(check["float32"], check["released"])
    text, size = (out / "card.md").read_text(), sum((out / f).stat().st_size for f in release.BUNDLE_FILES)
    assert f"int8-rowcol+fp16 weights, {size / 1e6:.2f} MB" in text
    assert "| metric | float32 | int8-rowcol+fp16 | move (table units) |" in text
    assert repr(check["float32"]["ppl"]) in text and repr(check["released"]["ppl"]) in text
    assert runner.invoke(app, ["models", "list", "--dir", str(out.parent)]).exit_code == 0
    rec = Console(record=True, width=250)
    rec.print(released_table(release.released_models(out.parent), out.parent))
    listed = rec.export_text()
    assert "escm-int8" in listed and "int8-rowcol+fp16" in listed


def test_the_size_limit_counts_the_real_files_and_an_unknown_quantization_is_refused(checkpoint, tmp_path):
    card = release.release(checkpoint, tmp_path / "fits", quantize="int8", log=lambda s: None)
    size = sum((tmp_path / "fits" / f).stat().st_size for f in release.BUNDLE_FILES)
    assert sum(f["bytes"] for f in card["files"].values()) == size
    with pytest.raises(release.ReleaseError, match=rf"\({size} bytes\), over the .* limit.*--quantize int8"):
        release.release(checkpoint, tmp_path / "over", quantize="int8", limit=size - 1, log=lambda s: None)
    assert not (tmp_path / "over").exists()
    result = runner.invoke(app, ["models", "release", str(checkpoint), "--out", str(tmp_path / "q"),
                                 "--quantize", "int4"])
    assert result.exit_code == 2 and "--quantize 'int4' is not supported" in result.output
