"""The single-process trainer: loss falls, checkpoints resume exactly, early stopping, outputs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from trainers.config import ConfigError, TrainConfig, load_config
from trainers.loop import Trainer, rng_state, seed_everything, set_rng_state
from trainers.models.interface import Targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only thrashes


def make_cfg(tmp_path, prepared_sample, **kw):
    base = {
        "model": kw.pop("model", "escm"), "out_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"source": "sample", "cache_dir": str(prepared_sample.path.parent)},
        "model_overrides": {"flavour": "tiny"}, "warmup": 20, "lr_factor": 2.0, "batch_size": 8,
        "eval_every": 1000, "log_every": 5, "eval_generate": 8, "num_samples": 4,
    }
    base.update(kw)
    return load_config(TrainConfig, **base)


# IAMM's loss is mostly its four emotion heads' cross-entropies (eq. 24): batches of 16 give them 60 steps'
# worth of examples to fall by the same 15% (batches of 8 needed 150 steps). "paper": IAMM under the paper recipe
# (the authors' association weights, word selector, a [CLS] per turn and word + state association inputs).
@pytest.mark.parametrize("model, steps, batch_size, recipe", [
    ("transformer", 60, 8, "platform"), ("escm", 60, 8, "platform"), ("iamm", 60, 16, "platform"),
    ("iamm", 60, 16, "paper")])
def test_training_loss_falls(tmp_path, prepared_sample, model, steps, batch_size, recipe):
    cfg = make_cfg(tmp_path, prepared_sample, model=model, max_steps=steps, eval_every=steps // 2,
                   batch_size=batch_size, recipe=recipe, eval_from=0)
    trainer = Trainer(cfg, prepared_sample, log=lambda s: None)
    if recipe == "paper":
        c = trainer.raw_model.cfg
        assert (c.association_weights, c.word_selector, c.k3, c.utterance_cls, c.association_inputs) == (
            "reference", "reference", 15, True, "words_states")
    result = trainer.train()
    losses = [h["train_loss"] for h in result["history"] if "train_loss" in h]
    assert losses[-1] < 0.85 * losses[0]
    evals = [h for h in result["history"] if "valid_ppl" in h]
    assert [h["step"] for h in evals] == [steps // 2, steps]
    # training-time Dist/BLEU are over eval_generate examples: labelled sampled, never under the papers' names
    assert evals[0]["valid_sample_size"] == 8 and "valid_dist_1_sampled" in evals[0] and "valid_dist_1" not in evals[0]
    assert "valid_distinct_responses_sampled" in evals[0] and "valid_distinct_responses" not in evals[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the final evaluation decodes the whole valid split
    assert set(metrics["final"]) >= {"valid_ppl", "valid_ppl_token", "valid_dist_1", "valid_dist_2",
                                     "valid_dist_1_nltk", "valid_dist_2_nltk"}
    assert not any(k.endswith("_sampled") for k in metrics["final"]) and "ppl" in metrics["definitions"]
    assert "dist_n_nltk" in metrics["definitions"] and "valid_dist_1_nltk_sampled" in evals[0]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"context", "reference", "generated", "gold_emotion"} <= set(samples[0])
    if model != "transformer":
        assert "valid_acc" in metrics["final"] and samples[0]["predicted_emotion"] is not None
    if model == "iamm":   # the sample has no knowledge backend: built without knowledge
        assert trainer.raw_model.cfg.has_knowledge is False


def test_resume_reproduces_the_uninterrupted_run(tmp_path, prepared_sample):
    """Kill after step 6 (a checkpoint), resume in a fresh trainer: steps 7-9 match the straight run."""
    straight = Trainer(make_cfg(tmp_path / "a", prepared_sample, max_steps=9), prepared_sample, log=lambda s: None)
    losses = {}
    for _ in range(9):
        k, rows = straight._my_batches(straight.epoch)[straight.position]
        loss = straight.train_step(straight.train_data.rows_batch(k, rows)).loss.item()
        losses[straight.step] = loss  # train_step has advanced .step to this step's number
        straight.position += 1

    cfg = make_cfg(tmp_path / "b", prepared_sample, max_steps=6, eval_every=6, eval_generate=2)
    first = Trainer(cfg, prepared_sample, log=lambda s: None)
    first.train()
    assert first.step == 6
    torch.manual_seed(1234)                     # disturb global RNG state: resume must restore it
    resumed = Trainer(cfg.model_copy(update={"max_steps": 9}), prepared_sample, log=lambda s: None)
    assert resumed.resume()
    assert resumed.step == 6
    for step in (7, 8, 9):
        k, rows = resumed._my_batches(resumed.epoch)[resumed.position]
        loss = resumed.train_step(resumed.train_data.rows_batch(k, rows)).loss.item()
        resumed.position += 1
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-6)


def test_early_stopping_on_a_metric(tmp_path, prepared_sample):
    # lr ~ 0: valid metrics never improve after the first evaluation -> stop after `patience` evals
    cfg = make_cfg(tmp_path, prepared_sample, max_steps=200, eval_every=2, patience=2, lr_factor=1e-9,
                   early_stop_metric="valid_acc", eval_generate=1)
    result = Trainer(cfg, prepared_sample, log=lambda s: None).train()
    assert result["step"] == 6


def test_bad_train_config_names_the_field(tmp_path, prepared_sample):
    with pytest.raises(ConfigError, match="early_stop_metric"):
        make_cfg(tmp_path, prepared_sample, early_stop_metric="valid_vibes")
    with pytest.raises(ConfigError, match=r"valid_dist_1 needs eval_generate = 0 \(the whole valid split\)"):
        make_cfg(tmp_path, prepared_sample, early_stop_metric="valid_dist_1", eval_generate=256)
    with pytest.raises(ConfigError, match=r"valid_dist_2_sampled needs eval_generate > 0"):
        make_cfg(tmp_path, prepared_sample, early_stop_metric="valid_dist_2_sampled", eval_generate=0)
    assert make_cfg(tmp_path, prepared_sample, early_stop_metric="valid_dist_1", eval_generate=0).eval_generate == 0
    with pytest.raises(ConfigError, match="batch_size"):
        make_cfg(tmp_path, prepared_sample, batch_size=0)
    with pytest.raises(ConfigError, match="strategy"):
        make_cfg(tmp_path, prepared_sample, decode={"strategy": "telepathy"})


def test_no_samples_requested_writes_an_empty_samples_file(tmp_path, prepared_sample):
    cfg = make_cfg(tmp_path, prepared_sample, max_steps=2, eval_every=2, eval_generate=1, num_samples=0)
    Trainer(cfg, prepared_sample, log=lambda s: None).train()
    assert (tmp_path / "run" / "samples.jsonl").read_text() == ""


def test_rng_state_round_trip():
    seed_everything(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(99)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def _run_steps(trainer, n):
    """n train steps along the trainer's own plan (epochs advance as in `train`), -> {step: loss}."""
    losses = {}
    for _ in range(n):
        batches = trainer._my_batches(trainer.epoch)
        if trainer.position >= len(batches):
            trainer.epoch, trainer.position = trainer.epoch + 1, 0
            batches = trainer._my_batches(trainer.epoch)
        loss = trainer.train_step(trainer.train_data.rows_batch(*batches[trainer.position])).loss.item()
        losses[trainer.step] = loss  # train_step has advanced .step to this step's number
        trainer.position += 1
    return losses


def test_random_batching_resumes_mid_epoch_and_across_epochs(tmp_path, prepared_sample):
    """159 train examples in batches of 64: 3 batches an epoch. Killed after step 4 (epoch 1, batch 1), the
    resumed run's steps 5-7 (the rest of epoch 1, then epoch 2) are the uninterrupted run's."""
    kw = dict(batching="random", batch_size=64)
    straight = Trainer(make_cfg(tmp_path / "a", prepared_sample, **kw), prepared_sample, log=lambda s: None)
    assert len(straight._my_batches(0)) == 3
    losses = _run_steps(straight, 7)
    cfg = make_cfg(tmp_path / "b", prepared_sample, max_steps=4, eval_every=4, eval_generate=2, **kw)
    Trainer(cfg, prepared_sample, log=lambda s: None).train()
    torch.manual_seed(1234)
    resumed = Trainer(cfg.model_copy(update={"max_steps": 7}), prepared_sample, log=lambda s: None)
    assert resumed.resume() and (resumed.step, resumed.epoch, resumed.position) == (4, 1, 1)
    again = _run_steps(resumed, 3)
    assert again == pytest.approx({s: losses[s] for s in (5, 6, 7)}, rel=1e-5, abs=1e-6)
    # the checkpoint's position indexes the random plan: resuming it with the other plan is refused
    other = Trainer(cfg.model_copy(update={"batching": "bucketed"}), prepared_sample, log=lambda s: None)
    with pytest.raises(ValueError, match="batching='random'"):
        other.resume()


def test_batching_picks_the_epoch_plan_and_the_loss_stays_a_token_mean(tmp_path, prepared_sample):
    bucketed = Trainer(make_cfg(tmp_path / "a", prepared_sample), prepared_sample, log=lambda s: None)
    assert bucketed.cfg.batching == "bucketed"  # the default: the plan as before
    want = bucketed.train_data.plan(8, seed=0, epoch=1)
    assert [(k, r.tolist()) for k, r in bucketed._my_batches(1)] == [(k, r.tolist()) for k, r in want]
    random = Trainer(make_cfg(tmp_path / "b", prepared_sample, batching="random"), prepared_sample, log=lambda s: None)
    plan = random._my_batches(1)
    assert [r.tolist() for _, r in plan] == [r.tolist() for _, r in random.train_data.random_plan(8, 0, 1)]
    # the generation loss of a mixed batch is its NLL summed over target tokens / its tokens (the reference's
    # NLLLoss mean), and each example's NLL is the one it gets in its own bucket: padding changes nothing
    batch = random.train_data.rows_batch(*plan[0])
    random.raw_model.eval()
    with torch.no_grad():
        out = random.raw_model(batch, Targets.of(batch))
    assert out.gen_loss.item() == pytest.approx(out.nll_sum.sum().item() / out.num_tokens.sum().item(), rel=1e-5)
    assert out.gen_loss.item() != pytest.approx((out.nll_sum / out.num_tokens).mean().item(), rel=1e-3)
    data = random.train_data
    for i, example in enumerate(plan[0][1][:3]):
        k, row = (int(v) for v in data.where[example])
        alone = data.rows_batch(k, np.array([row]))
        with torch.no_grad():
            nll = random.raw_model(alone, Targets.of(alone)).nll_sum
        assert nll.item() == pytest.approx(out.nll_sum[i].item(), rel=1e-4)


def test_paper_recipe_batches_at_random(tmp_path):
    assert load_config(TrainConfig, overrides=["recipe=paper"]).batching == "random"
    assert load_config(TrainConfig, overrides=["recipe=paper", "batching=bucketed"]).batching == "bucketed"
    with pytest.raises(ConfigError, match="batching"):
        load_config(TrainConfig, overrides=["batching=sorted"])


def test_resume_refuses_a_checkpoint_of_another_model_config(tmp_path, prepared_sample):
    """A recipe that changes a model option (the paper recipe's gcn_embed_scale) must not silently change the model
    of a run it resumes; a field the checkpoint predates counts at its default."""
    cfg = make_cfg(tmp_path, prepared_sample, max_steps=2, eval_every=2, eval_generate=1)
    Trainer(cfg, prepared_sample, log=lambda s: None).train()
    scaled = {**cfg.model_overrides, "gcn_embed_scale": True}
    other = Trainer(cfg.model_copy(update={"model_overrides": scaled}), prepared_sample, log=lambda s: None)
    with pytest.raises(ValueError, match="gcn_embed_scale: False -> True"):
        other.resume()
    same = Trainer(cfg, prepared_sample, log=lambda s: None)
    state = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
    del state["model_config"]["gcn_embed_scale"]  # a checkpoint written before the field existed
    same.load_state_dict(state)
    assert same.step == 2
