"""MLflow reports: the plots of a run and, on a sweep's parent run, the ablation table in the papers' layout
(Acc / PPL / PPL_token / Dist-1 / Dist-2 per variant, mean and std over seeds) and the best child.

The table reads each child's final evaluation (best weights, whole valid split) under the papers' definitions
(trainers.metrics.DEFINITIONS); PPL_token, the token-level perplexity, is not in the papers' tables."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

from services.registry import client

TABLE_METRICS = {"Acc": ("valid_acc", 100.0), "PPL": ("valid_ppl", 1.0), "PPL_token": ("valid_ppl_token", 1.0),
                 "Dist-1": ("valid_dist_1", 100.0), "Dist-2": ("valid_dist_2", 100.0)}  # papers' layout: x100


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def confusion_figure(trainer):
    """Row-normalised emotion confusion matrix of the trainer's final evaluation (valid split, teacher-forced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from trainers.data.emotions import EMOTIONS
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
    import matplotlib

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


def child_runs(uri: str, parent_run_id: str) -> list:
    c = client(uri)
    parent = c.get_run(parent_run_id)
    return c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         max_results=10000)


def final_value(metrics: dict, key: str) -> float | None:
    """The final (best-weights) value of `key`; the last evaluation's for a trial stopped early."""
    v = metrics.get(f"final_{key}", metrics.get(key))
    return v if v is not None and math.isfinite(v) else None


def ablation_table(children: list, variants: list[str] | None = None) -> list[dict]:
    """Rows = variants (tag `variant`), cols Acc / PPL / PPL_token / Dist-1 / Dist-2 as mean and std over seeds."""
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
    import csv

    buf = io.StringIO()
    cols = ["variant", "seeds", *(c for col in TABLE_METRICS for c in (col, f"{col}_std"))]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def table_markdown(rows: list[dict]) -> str:
    head = "| Model | " + " | ".join(TABLE_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_METRICS) + 1)]
    for r in rows:
        cells = [f"{r[c]:.2f} ± {r[f'{c}_std']:.2f}" if math.isfinite(r[c]) else "n/a" for c in TABLE_METRICS]
        lines.append(f"| {r['variant']} (n={r['seeds']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finish_parent(uri: str, parent_run_id: str, metric: str, mode: str, variants: list[str]) -> dict:
    """Log the ablation table (CSV + markdown) on the parent and tag the best child by final `metric`."""
    c = client(uri)
    children = child_runs(uri, parent_run_id)
    rows = ablation_table(children, variants)
    c.log_text(parent_run_id, table_csv(rows), "ablation_table.csv")
    c.log_text(parent_run_id, table_markdown(rows), "ablation_table.md")
    scored = [(v, r) for r in children if (v := final_value(r.data.metrics, metric)) is not None]
    best = None
    if scored:
        value, best = (min if mode == "min" else max)(scored, key=lambda vr: vr[0])
        c.set_tag(parent_run_id, "best_child_run_id", best.info.run_id)
        c.set_tag(parent_run_id, "best_metric", f"{metric}={value:.6g}")
        c.log_metric(parent_run_id, f"best_{metric}", value)
        c.set_tag(best.info.run_id, "best_in_sweep", "true")
    return {"rows": rows, "best_run_id": best.info.run_id if best else None, "children": len(children)}
