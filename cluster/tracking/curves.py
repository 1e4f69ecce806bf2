"""`edp report`: a sweep's learning curves from MLflow's metric history of its parent run's child runs.

    report = write_report(uri, parent_run_id, out_dir, last=3)   # curves.md, curves.csv, curves.png

The table: per variant (tag `variant`), valid Acc, PPL, Dist-1, Dist-2 in the papers' units, mean +- std (sample
std) over every seed's (tag `seed`) last `last` evaluations pooled, so the spread holds both the seeds' spread
and the end of training's wobble. The figure: each column per evaluation step, one line per variant (the mean
over its seeds at that step). Dist is read from `valid_dist_n` (the whole split decoded) or, where a run logged
only a sample's, `valid_dist_n_sampled`; the table says which.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cluster.tracking.reports import runs_of_parent
from services.registry import client

# column -> (metric keys in order of preference, scale to the papers' units)
CURVE_METRICS = {"Acc": (("valid_acc",), 100.0), "PPL": (("valid_ppl",), 1.0),
                 "Dist-1": (("valid_dist_1", "valid_dist_1_sampled"), 100.0),
                 "Dist-2": (("valid_dist_2", "valid_dist_2_sampled"), 100.0)}


class ReportError(ValueError):
    """The parent run is unknown or has nothing to report."""


@dataclass
class Curves:
    """One child run's evaluations: column -> [(step, value in the papers' units)], sorted by step."""

    variant: str
    points: dict[str, list[tuple[int, float]]]
    keys: dict[str, str]  # column -> the metric key it was read from


@dataclass
class Report:
    rows: list[dict]
    markdown: str
    paths: dict[str, Path]


def child_runs(uri: str, parent_run_id: str) -> list:
    """The parent's child runs; ReportError naming the run when it does not exist or has no children."""
    from mlflow.exceptions import MlflowException

    try:
        children = runs_of_parent(uri, parent_run_id)
    except MlflowException as e:
        raise ReportError(f"no MLflow run {parent_run_id!r} at {uri}: give a sweep's parent run id "
                          f"(the sweep prints it; {e.error_code})") from e
    if not children:
        raise ReportError(f"run {parent_run_id!r} at {uri} has no child runs: give a sweep's parent run id, "
                          "not a trial's or a single training run's")
    return children


def history(c, run) -> Curves:
    """A child run's valid metrics per evaluation step (the last value logged at a step wins: a retried trial
    logs its evaluations again)."""
    points, keys = {}, {}
    for col, (names, scale) in CURVE_METRICS.items():
        for name in names:
            logged = sorted(c.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
            by_step = {m.step: m.value * scale for m in logged if math.isfinite(m.value)}
            if by_step:
                points[col], keys[col] = sorted(by_step.items()), name
                break
    return Curves(run.data.tags.get("variant", run.info.run_name), points, keys)


def curve_table(curves: list[Curves], last: int, variants: list[str] | None = None) -> list[dict]:
    """Per variant: each column's mean and sample std over its seeds' last `last` evaluations pooled."""
    if last < 1:
        raise ReportError(f"--last must be >= 1, got {last}")
    groups: dict[str, list[Curves]] = defaultdict(list)
    for cv in curves:
        groups[cv.variant].append(cv)
    order = [v for v in (variants or []) if v in groups] + sorted(set(groups) - set(variants or []))
    rows = []
    for variant in order:
        runs = groups[variant]
        row = {"variant": variant, "seeds": len(runs)}
        for col in CURVE_METRICS:
            values = [v for cv in runs for _, v in cv.points.get(col, [])[-last:]]
            row[col] = statistics.fmean(values) if values else math.nan
            row[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{col}_n"] = len(values)
        rows.append(row)
    return rows


def table_markdown(rows: list[dict], curves: list[Curves], last: int) -> str:
    cols = list(CURVE_METRICS)
    lines = [f"| variant (seeds) | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r[c]:.2f} ± {r[f'{c}_std']:.2f}" if r[f"{c}_n"] else "n/a" for c in cols]
        lines.append(f"| {r['variant']} ({r['seeds']}) | " + " | ".join(cells) + " |")
    keys = sorted({f"{col}: {key}" for cv in curves for col, key in cv.keys.items()})
    return "\n".join(lines + ["", f"Mean ± std over every seed's last {last} evaluations pooled (valid split); "
                              f"metrics read: {', '.join(keys)}."]) + "\n"


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    cols = ["variant", "seeds", *(f"{c}{s}" for c in CURVE_METRICS for s in ("", "_std", "_n"))]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def curves_figure(curves: list[Curves], variants: list[str]):
    """Acc, PPL, Dist-1, Dist-2 per evaluation step, one line per variant (mean over its seeds at each step)."""
    import matplotlib  # only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.8))
    for ax, col in zip(axes, CURVE_METRICS, strict=True):
        for variant in variants:
            at: dict[int, list[float]] = defaultdict(list)
            for cv in curves:
                if cv.variant == variant:
                    for step, value in cv.points.get(col, []):
                        at[step].append(value)
            if at:
                steps = sorted(at)
                ax.plot(steps, [statistics.fmean(at[s]) for s in steps], marker="o", markersize=3, label=variant)
        ax.set_title(col)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def write_report(uri: str, parent_run_id: str, out_dir: Path, last: int = 3) -> Report:
    """curves.md, curves.csv and curves.png for the sweep under `parent_run_id`, in `out_dir`."""
    if last < 1:
        raise ReportError(f"--last must be >= 1, got {last}")
    c = client(uri)
    children = child_runs(uri, parent_run_id)
    curves = [history(c, run) for run in children]
    variants_param = c.get_run(parent_run_id).data.params.get("variants", "")
    rows = curve_table(curves, last, [v for v in variants_param.split(",") if v])
    text = table_markdown(rows, curves, last)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "curves.md", "csv": out_dir / "curves.csv", "png": out_dir / "curves.png"}
    paths["markdown"].write_text(f"Sweep parent run `{parent_run_id}` ({len(children)} child runs).\n\n{text}")
    paths["csv"].write_text(table_csv(rows))
    curves_figure(curves, [r["variant"] for r in rows]).savefig(paths["png"], dpi=110)
    return Report(rows, text, paths)
