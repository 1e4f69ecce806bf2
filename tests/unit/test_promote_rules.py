"""Promotion rules without a server: the metric's direction, the comparison key, the recipe tag."""

from __future__ import annotations

import json

import pytest

from cluster.tracking.promotion import MAX_TAG_CHARS, PromotionError, comparison_key, metric_mode, recipe
from trainers.metrics import METRIC_MODES


@pytest.mark.parametrize(("metric", "mode", "expected"), [
    ("valid_ppl", None, "min"), ("valid_acc", None, "max"), ("final_valid_ppl", None, "min"),
    ("valid_loss", None, "min"), ("valid_dist_2", None, "max"), ("valid_dist_1_sampled", None, "max"),
    ("valid_ppl_token", None, "min"), ("valid_ppl", "max", "max"), ("my_metric", "min", "min"),
])
def test_direction_comes_from_the_trainers_table_and_mode_overrides_it(metric, mode, expected):
    assert metric_mode(metric, mode) == expected


def test_unknown_metric_without_mode_lists_the_known_ones_and_bad_mode_fails():
    with pytest.raises(PromotionError, match="unknown metric 'bleu'") as e:
        metric_mode("bleu")
    assert all(m in str(e.value) for m in METRIC_MODES) and "--mode" in str(e.value)
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        metric_mode("valid_ppl", "up")


def test_comparison_key_marks_what_a_run_did_not_record():
    assert comparison_key({"data.key": "abc", "eval.split": "valid", "model": "escm"}) == {
        "data.key": "abc", "eval.split": "valid", "metric_definition": "?"}


def test_recipe_is_the_config_params_as_json_within_the_tag_limit():
    params = {"config.model": "escm", "config.seed": "0", "model": "escm", "data.key": "abc"}
    assert json.loads(recipe(params)) == {"model": "escm", "seed": "0"}
    long = recipe({f"config.k{i}": "x" * 100 for i in range(100)})
    assert len(long) <= MAX_TAG_CHARS and long.endswith("config.yaml has it all)")


def test_decide_without_mlflow_refuses_worse_or_incomparable_and_force_overrides():
    from cluster.tracking.promotion import Standing, decide

    key = {"data.key": "k", "eval.split": "valid", "metric_definition": "d"}
    cand = Standing("r1", 10.0, key)

    def run(apart=(), champion=None, force=False):
        lines: list[str] = []
        verdict = decide(cand, list(apart), champion, name="escm", metric="valid_ppl", mode="min", force=force,
                         say=lines.append)
        return verdict, lines

    assert run() == ("promote", ["champion: none ('escm' has no alias 'champion') -> promote"])
    assert run(champion=Standing("r0", 12.0, key, version="1"))[0] == "promote"
    assert run(champion=Standing("r0", 10.0, key, version="1"))[0] == "promote"  # a tie is not worse
    verdict, lines = run(champion=Standing("r0", 9.0, key, version="1"))
    assert verdict == "refused" and "worse than champion 9" in lines[-1]
    assert run(champion=Standing("r0", 9.0, key, version="1"), force=True)[0] == "promote"
    assert run(champion=Standing("r1", 9.0, key, version="1"))[0] == "unchanged"
    other = Standing("r0", 12.0, {**key, "data.key": "other"}, version="1")
    assert run(champion=other)[0] == "refused" and run(champion=other, force=True)[0] == "promote"
    verdict, lines = run(apart=[Standing("r2", 11.0, other.key)])
    assert verdict == "refused" and len(lines) == 1 and "not comparable: 1 ranked run(s)" in lines[0]
    assert run(champion=Standing("r0", None, key, version="1"))[0] == "refused"  # nothing to compare with
