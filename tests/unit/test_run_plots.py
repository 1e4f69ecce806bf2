"""The run's plots come from its final evaluation: the confusion matrix counts what that evaluation predicted."""

from __future__ import annotations

import pytest

from cluster.tracking.reports import confusion_figure
from tests.unit.test_trainer import make_cfg
from trainers.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", ["escm", "transformer"])
def test_confusion_figure_shows_the_final_evaluations_predictions(tmp_path, prepared_sample, model):
    trainer = Trainer(make_cfg(tmp_path, prepared_sample, model=model, max_steps=2, eval_every=2, eval_generate=2),
                      prepared_sample, log=lambda s: None)
    result = trainer.train()
    evaluation = trainer.final_evaluation
    fig = confusion_figure(trainer)
    if model == "transformer":  # no emotion head: no figure
        assert evaluation.emotion_pred is None and fig is None
        return
    pred, gold = evaluation.emotion_pred, evaluation.emotion_gold
    assert len(pred) == len(gold) == len(trainer.valid_data)
    assert (pred == gold).mean() == pytest.approx(result["final"]["valid_acc"])
    assert f"n={len(gold)}, acc={(pred == gold).mean():.3f}" in fig.axes[0].get_title()
