"""MLflow reports: the plots of a run and, on a sweep's parent run, the ablation table in the papers' layout
(Acc / PPL / PPL_token / Dist-1 / Dist-2, and Dist-n over nltk words as the papers' code counts it, per variant,
mean and std over seeds) and the best child.

The table reads each child's final evaluation (best weights, whole valid split) under the papers' definitions
(trainers.metrics.DEFINITIONS); PPL_token, the token-level perplexity, is not in the papers' tables. A sweep
that names its paper's figures (`PaperReference`) gets them under each row, and a second table: each
ablation's change against the full model beside the paper's, and whether the two move the same way."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from typing import Any

from pydantic import Field, model_validator

from services.registry import client
from trainers.config import StrictModel
from trainers.data.emotions import EMOTIONS

TABLE_METRICS = {"Acc": ("valid_acc", 100.0), "PPL": ("valid_ppl", 1.0), "PPL_token": ("valid_ppl_token", 1.0),
                 "Dist-1": ("valid_dist_1", 100.0), "Dist-2": ("valid_dist_2", 100.0),
                 "Dist-1_nltk": ("valid_dist_1_nltk", 100.0),  # Dist over nltk words, as the papers' code
                 "Dist-2_nltk": ("valid_dist_2_nltk", 100.0)}  # papers' layout: x100


class PaperReference(StrictModel):
    """A paper's figures for a sweep's variants, shown beside the sweep's own in the parent run's table."""

    source: str = Field(..., description="where the figures come from (paper, table, split)")
    baseline: str = Field(..., description="the full model's variant: the ablations' changes are against it")
    rows: dict[str, dict[str, float]] = Field(..., description="variant -> {column of the table: value}")

    @model_validator(mode="after")
    def _check(self) -> PaperReference:
        if self.baseline not in self.rows:
            raise ValueError(f"baseline {self.baseline!r} has no row")
        for variant, row in self.rows.items():
            unknown = sorted(set(row) - set(TABLE_METRICS))
            if unknown:
                raise ValueError(f"rows.{variant}: unknown column(s) {unknown}; columns are {list(TABLE_METRICS)}")
        return self


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def confusion_figure(trainer):
    """Row-normalised emotion confusion matrix of the trainer's final evaluation (valid split, teacher-forced)."""
    import matplotlib  # matplotlib, numpy, torch: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from trainers.metrics import confusion_matrix

    pred, gold = trainer.final_evaluation.emotion_pred, trainer.final_evaluation.emotion_gold
    if pred is None:
        return None
    cm = confusion_matrix(pred, gold).astype(float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=90, fontsize=6)
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"emotion confusion ({trainer.cfg.model}, valid, n={len(gold)}, acc={(pred == gold).mean():.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    plt.close(fig)
    return fig


def loss_figure(history: list[dict]):
    import matplotlib  # matplotlib, numpy, torch: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    valid = [(h["step"], h["valid_loss"]) for h in history if "valid_loss" in h]
    for points, label in ((train, "train loss"), (valid, "valid loss")):
        if points:
            ax.plot(*zip(*points), marker="o" if label.startswith("valid") else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per token")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


# ------------------------------------------------------------------------------------------------
# Parent run: the ablation table and the best child


def runs_of_parent(uri: str, parent_run_id: str) -> list:
    """Every child run (any status) nested under `parent_run_id`."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    return c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         max_results=10000)


def final_value(metrics: dict, key: str) -> float | None:
    """The final (best-weights) value of `key`; the last evaluation's for a trial stopped early."""
    v = metrics.get(f"final_{key}", metrics.get(key))
    return v if v is not None and math.isfinite(v) else None


def ablation_table(children: list, variants: list[str] | None = None) -> list[dict]:
    """Rows = variants (tag `variant`), cols `TABLE_METRICS` as mean and std over seeds."""
    groups: dict[str, list] = defaultdict(list)
    for run in children:
        groups[run.data.tags.get("variant", run.info.run_name)].append(run.data.metrics)
    order = [v for v in (variants or []) if v in groups] + sorted(set(groups) - set(variants or []))
    rows = []
    for variant in order:
        row: dict[str, Any] = {"variant": variant, "seeds": len(groups[variant])}
        for col, (key, scale) in TABLE_METRICS.items():
            vals = [v * scale for m in groups[variant] if (v := final_value(m, key)) is not None]
            mean = sum(vals) / len(vals) if vals else float("nan")
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[col], row[f"{col}_std"] = mean, std
        rows.append(row)
    return rows


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    cols = ["variant", "seeds", *(c for col in TABLE_METRICS for c in (col, f"{col}_std"))]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def table_markdown(rows: list[dict], paper: PaperReference | None = None) -> str:
    """The table; with `paper`, the paper's row under each variant it has, then `direction_markdown`."""
    head = "| Model | " + " | ".join(TABLE_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_METRICS) + 1)]
    for r in rows:
        cells = [f"{r[c]:.2f} ± {r[f'{c}_std']:.2f}" if math.isfinite(r[c]) else "n/a" for c in TABLE_METRICS]
        lines.append(f"| {r['variant']} (n={r['seeds']}) | " + " | ".join(cells) + " |")
        if paper is not None and r["variant"] in paper.rows:
            theirs = paper.rows[r["variant"]]
            lines.append(f"| {r['variant']}, paper | " + " | ".join(
                f"{theirs[c]:.2f}" if c in theirs else "–" for c in TABLE_METRICS) + " |")
    if paper is not None:
        lines += ["", f"Paper: {paper.source}.", "", direction_markdown(rows, paper)]
    return "\n".join(lines) + "\n"


def directions(rows: list[dict], paper: PaperReference) -> list[dict]:
    """Per ablation and column both have: our mean change against the baseline, the paper's, and whether they have
    the same sign (None when either change is 0 or a value is missing)."""
    ours = {r["variant"]: r for r in rows}
    base, base_paper = ours.get(paper.baseline), paper.rows[paper.baseline]
    out = []
    for variant, theirs in paper.rows.items():
        if variant == paper.baseline or variant not in ours or base is None:
            continue
        for col in TABLE_METRICS:
            if col not in theirs or col not in base_paper:
                continue
            delta, delta_paper = ours[variant][col] - base[col], theirs[col] - base_paper[col]
            same = None if not math.isfinite(delta) or delta == 0 or delta_paper == 0 else \
                (delta > 0) == (delta_paper > 0)
            out.append({"variant": variant, "column": col, "delta": delta, "delta_paper": delta_paper, "same": same})
    return out


def direction_markdown(rows: list[dict], paper: PaperReference) -> str:
    """Each ablation's change against the full model, ours (paper's), and ✓ where the two move the same way."""
    found = directions(rows, paper)
    if not found:
        return f"No ablation to compare with {paper.baseline}: it, or every ablation with a paper row, did not run."
    cell = {(d["variant"], d["column"]): d for d in found}
    cols = [c for c in TABLE_METRICS if any(d["column"] == c for d in found)]
    marks = {True: " ✓", False: " ✗", None: ""}
    lines = [f"Change against {paper.baseline}: ours (paper's); ✓ same direction, ✗ opposite",
             "", "| Ablation | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for variant in dict.fromkeys(d["variant"] for d in found):
        cells = [f"{d['delta']:+.2f} ({d['delta_paper']:+.2f}){marks[d['same']]}" if (d := cell.get((variant, c)))
                 else "–" for c in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    decided = [d["same"] for d in found if d["same"] is not None]
    lines += ["", f"{sum(decided)} of {len(decided)} changes move in the paper's direction."]
    return "\n".join(lines)


def log_table(uri: str, parent_run_id: str, children: list, variants: list[str],
              paper: PaperReference | None = None, so_far: bool = False) -> list[dict]:
    """Log the ablation table of `children` on the parent as CSV + markdown. `so_far`: the table of the trials
    finished while the sweep runs, headed as such (a sweep stopped midway keeps it)."""
    rows = ablation_table(children, variants)
    text = table_markdown(rows, paper)
    if so_far:
        names = ", ".join(sorted(f"{r.data.tags.get('variant', r.info.run_name)}/s{r.data.tags.get('seed', '?')}"
                                 for r in children))
        text = (f"So far: the {len(children)} trial(s) finished ({names}); the sweep rewrites this table when "
                f"its last trial ends.\n\n{text}")
    c = client(uri)
    c.log_text(parent_run_id, table_csv(rows), "ablation_table.csv")
    c.log_text(parent_run_id, text, "ablation_table.md")
    return rows


def log_table_so_far(uri: str, parent_run_id: str, variants: list[str], paper: PaperReference | None = None) -> None:
    """The table of the parent's FINISHED children, logged each time a trial ends (`log_table`, `so_far`)."""
    finished = [r for r in runs_of_parent(uri, parent_run_id) if r.info.status == "FINISHED"]
    log_table(uri, parent_run_id, finished, variants, paper, so_far=True)


def finish_parent(uri: str, parent_run_id: str, metric: str, mode: str, variants: list[str],
                  paper: PaperReference | None = None) -> dict:
    """Log the ablation table (CSV + markdown, with `paper`'s figures) on the parent and tag the best child by
    final `metric`."""
    c = client(uri)
    children = runs_of_parent(uri, parent_run_id)
    rows = log_table(uri, parent_run_id, children, variants, paper)
    scored = [(v, r) for r in children if (v := final_value(r.data.metrics, metric)) is not None]
    best = None
    if scored:
        value, best = (min if mode == "min" else max)(scored, key=lambda vr: vr[0])
        c.set_tag(parent_run_id, "best_child_run_id", best.info.run_id)
        c.set_tag(parent_run_id, "best_metric", f"{metric}={value:.6g}")
        c.log_metric(parent_run_id, f"best_{metric}", value)
        c.set_tag(best.info.run_id, "best_in_sweep", "true")
    return {"rows": rows, "best_run_id": best.info.run_id if best else None, "children": len(children)}
