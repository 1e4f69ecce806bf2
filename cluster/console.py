"""Rich output of the `edp` commands and the demo: one console, progress bars and the tables they print.

Everything here renders results; nothing computes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.prometheus import fmt_ms
from cluster.tracking.reports import TABLE_METRICS

console = Console()


def plain(line: str) -> None:
    """Print `line` as it is (no markup, no highlighting, no wrapping): log lines, commands, URLs."""
    console.print(line, soft_wrap=True, markup=False, highlight=False)


def rich_progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    """A rich progress bar and the `(phase, done, total)` callback trainers.data.prepare expects."""
    bar = Progress(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=max(total, 1))
        bar.update(tasks[phase], completed=done, total=max(total, 1))

    return bar, update


def print_prepared(prepared) -> None:
    m = prepared.manifest
    table = Table(title=f"prepared data ({'cache hit' if prepared.cache_hit else 'built'}): {prepared.path}")
    table.add_column("split")
    for col in ("conversations", "examples", "skipped", "distinct texts"):
        table.add_column(col, justify="right")
    for split, c in m["counts"].items():
        table.add_row(split, str(c["conversations"]), str(c["examples"]), str(c["skipped"]), str(c["texts"]))
    console.print(table)
    vec = m["vectors"]
    oov = "n/a" if vec["oov_rate"] is None else f"{vec['oov_rate']:.1%} of {m['vocab_size']} words ({vec['source']})"
    t = m["timings"]
    rows = [
        ("source", m["source"]),
        ("vocabulary", f"{m['vocab_size']} words (min_freq {m['settings']['min_freq']})"),
        ("vectors OOV rate", oov),
        ("parser", m["substitutions"]["parser"]),
        ("knowledge", m["substitutions"]["knowledge"]["backend"]),
        ("parse time", f"{t['parse_s']:.1f} s for {t['parsed_texts']} texts"
                       f" ({t['parsed_texts'] / max(t['parse_s'], 1e-9):.0f} texts/s)"),
        ("total time", f"{t.get('cache_hit_s', t['total_s']):.2f} s" + (" (cache hit)" if prepared.cache_hit else "")),
    ]
    info = Table(show_header=False)
    for k, v in rows:
        info.add_row(k, str(v))
    console.print(info)
    for split, bad in m["invalid"].items():
        for line in bad[:5]:
            console.print(f"[yellow]skipped[/] {split}: {line}")
        if len(bad) > 5:
            console.print(f"[yellow]... and {len(bad) - 5} more skipped in {split}[/]")


def print_evaluation(result: dict, split: str) -> None:
    dtype = result.get("dtype") or {}
    console.print(f"{split}: {result['examples']} examples ({result['skipped']} skipped); weights "
                  f"{dtype.get('weights', '?')}, computed in {dtype.get('compute', '?')}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():  # one row per metric: readable at any terminal width
        table.add_row(k, f"{v:.4g}")
    console.print(table)
    unseen = result.get("unseen_vectors")
    if unseen:
        console.print(unseen_line(unseen))


def unseen_line(unseen: dict) -> str:
    """One line on how unseen context words were encoded (metrics.json's `unseen_vectors`)."""
    how = (f"on ({unseen['source']}, scale {unseen['scale']:.6g}): {unseen['examples_with_unseen_vector']} examples "
           f"({100 * unseen['share_with_unseen_vector']:.1f} %) had a context word outside the vocabulary encoded "
           "with its pretrained vector") if unseen["enabled"] else "off: context words outside the vocabulary are [UNK]"
    setting = (f" (override of the model's setting: {'on' if unseen['model_setting'] else 'off'})"
               if unseen["override"] else "")
    return (f"unseen_vectors {how}{setting}; {unseen['examples_with_unk_context_word']} examples "
            f"({100 * unseen['share_with_unk_context_word']:.1f} %) have an [UNK] context word")


def released_table(rows, root) -> Table:
    """The released models of a folder (`trainers.release.Released` rows): card figures and the hash check."""
    table = Table(title=f"released models in {root}")
    for col in ("name", "model", "params", "dtype", "size MB", "split", "Acc", "PPL", "Dist-1", "Dist-2", "commit",
                "files"):
        table.add_column(col, justify="right" if col in ("params", "size MB", "Acc", "PPL", "Dist-1", "Dist-2")
                         else "left")
    for r in rows:
        status = "[green]verified[/]" if r.ok else f"[red]{escape('; '.join(r.problems))}[/]"
        if r.card is None:
            table.add_row(r.path.name, *["-"] * 10, status)
            continue
        c, ev = r.card, r.card.get("evaluation") or {}
        m = ev.get("metrics", {})
        figures = [_figure(m, k, scale) for k, scale in (("acc", 100), ("ppl", 1), ("dist_1", 100), ("dist_2", 100))]
        size = sum(f["bytes"] for f in c["files"].values()) / 1e6
        table.add_row(c["name"], c["model"]["type"], f"{c['model']['params']:,}", c["model"]["weights_dtype"],
                      f"{size:.1f}", ev.get("split", "-"), *figures, (c["training"]["commit"] or "-")[:10], status)
    return table


def _figure(metrics: dict, key: str, scale: float) -> str:
    """A card metric as the papers' tables print it (Acc and Dist-n x100), '-' when the card has none."""
    return "-" if key not in metrics else f"{metrics[key] * scale:.2f}"


def print_sweep(name: str, summary: dict) -> None:
    """The ablation table (mean ± std over seeds) and the parent / best child runs of a finished sweep."""
    table = Table(title=f"sweep {name}: {summary['trials']} trials in {summary['wall_s']:.0f} s")
    table.add_column("variant")
    for col in TABLE_METRICS:
        table.add_column(col, justify="right")
    for r in summary["rows"]:
        table.add_row(r["variant"], *(f"{r[c]:.2f} ± {r[c + '_std']:.2f}" for c in TABLE_METRICS))
    console.print(table)
    console.print(f"parent run {summary['parent_run_id']} ({summary['tracking_uri']}); "
                  f"best child {summary['best_run_id']}")


def stack_table(rows, title: str = "edp stack") -> Table:
    """Service, URL, pid and health of each `cluster.local.stack.ServiceStatus` row."""
    table = Table(title=title)
    for col in ("service", "URL", "pid", "healthy"):
        table.add_column(col)
    for r in rows:
        pid = str(r.pid) if r.pid else "-"
        if r.name == "serve":
            health = "[green]yes[/]" if r.healthy else "[dim]not deployed[/]"
        else:
            health = "[green]yes[/]" if r.healthy else ("[red]no[/]" if r.running else "[dim]stopped[/]")
        table.add_row(r.name, r.url, pid, health)
    return table


def print_latency(rows, window: str, url: str) -> None:
    """Rate and p50/p95/p99 per route (`cluster.prometheus.RouteLatency` rows)."""
    table = Table(title=f"request latency over the last {window} ({url})")
    for col in ("source", "route", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("source", "route") else "right")
    for r in rows:
        table.add_row(r.source, r.route, f"{r.rate:.2f}", fmt_ms(r.p50), fmt_ms(r.p95), fmt_ms(r.p99))
    console.print(table)


def print_comparison(result, url: str, out: Console = console) -> None:
    """Champion vs challenger figures (`cluster.compare.Comparison`), one row per role and version."""
    pct = lambda v: "-" if math.isnan(v) else f"{v * 100:.1f}%"  # noqa: E731
    table = Table(title=f"{result.name}: champion vs challenger over the last {result.window} ({url})")
    for col in ("role", "version", "requests", "errors", "p50 ms", "p95 ms", "tokens", "top emotions",
                "agrees w/ champion"):
        table.add_column(col, justify="left" if col in ("role", "top emotions") else "right")
    for m in result.models:
        top = ", ".join(f"{e} {p * 100:.0f}%" for e, p in list(m.emotions.items())[:3]) or "-"
        table.add_row(m.role, m.version, f"{m.requests:.0f}", pct(m.error_rate), fmt_ms(m.p50_ms), fmt_ms(m.p95_ms),
                      "-" if math.isnan(m.mean_tokens) else f"{m.mean_tokens:.1f}", top, pct(m.agreement))
    out.print(table)
    if not math.isnan(result.emotion_tv):
        out.print(f"emotion distributions: total variation distance {result.emotion_tv:.3f} "
                  "(0 = the same, 1 = disjoint)")


def print_demo(result, out: Console = console) -> None:
    """The demo's runs, champion and why, example responses, latency, timings and the URLs to look at."""
    runs = Table(title="sweep `demo`: one MLflow parent run, one nested child run per trial")
    for col in ("variant", "valid Acc", "valid PPL", "PPL_token", "Dist-1", "Dist-2", "Dist-1_nltk", "Dist-2_nltk",
                "run"):
        runs.add_column(col, justify="right" if col != "variant" else "left")
    fmt = lambda v, scale=1.0: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
    for r in sorted(result.runs, key=lambda r: r.valid_ppl if r.valid_ppl is not None else math.inf):
        runs.add_row(r.variant, fmt(r.valid_acc, 100), fmt(r.valid_ppl), fmt(r.valid_ppl_token),
                     fmt(r.valid_dist_1, 100), fmt(r.valid_dist_2, 100), fmt(r.valid_dist_1_nltk, 100),
                     fmt(r.valid_dist_2_nltk, 100), r.run_id[:8])
    out.print(runs)
    d = result.decision
    out.print(f"[bold]champion[/]: models:/{d.name}@champion -> version {d.version} ({d.action})")
    for line in d.lines:
        out.print(f"  {line}")
    out.print(example_table(result))
    lat = result.latency
    if "p50" in lat:
        out.print(f"[bold]latency[/] (Prometheus, Serve HTTP, /v1/respond): p50 {lat['p50']:.0f} ms, "
                  f"p99 {lat['p99']:.0f} ms  [dim]{lat['query']}[/]")
    else:
        out.print("[yellow]latency: Prometheus has no samples yet; try `edp metrics` in a minute[/]")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
    out.print(f"[bold]time[/]: {steps}")
    urls = Table(title="the stack is still running", show_header=False)
    for name, label in (("ray", "Ray dashboard"), ("mlflow", "MLflow UI"), ("serve", "Serve endpoint"),
                        ("released", "the released model"), ("prometheus", "Prometheus"), ("s3", "S3 (SeaweedFS)")):
        if name in result.urls:
            urls.add_row(label, result.urls[name] + ("/v1/respond" if name in ("serve", "released") else ""))
    urls.add_row("stop it", "edp stack down   (or: .venv/bin/edp stack down)")
    out.print(urls)


def example_table(result) -> Table:
    """The example requests with each served model's answer: the released model's (trained on the full ED train
    split) beside the sample-trained champion's, when the demo served a release."""
    released = dict((json.dumps(b, sort_keys=True), a) for b, a in result.released_responses)
    models = [(f"released model (models:/escm-ed/{result.released_version}, full ED train)", released)] \
        if released else []
    champion = dict((json.dumps(b, sort_keys=True), a) for b, a in result.responses)
    models.append((f"champion (models:/{result.decision.name}/{result.decision.version}, trained on the demo's data)",
                   champion))
    table = Table(title="example responses from POST /v1/respond", show_lines=True)
    table.add_column("context", overflow="fold")
    for title, _ in models:
        table.add_column(title, overflow="fold")
    for key in dict.fromkeys([*released, *champion]):
        body = json.loads(key)
        table.add_row(escape(" / ".join(body["context"])), *(_answer_text(answers.get(key)) for _, answers in models))
    return table


def _answer_text(answer: dict | None) -> str:
    """A response with its top emotion and first evidence (words or word pairs), or why there is none."""
    if answer is None:
        return "-"
    if "response" not in answer:
        return f"[red]failed: {escape(str(answer.get('error', answer)))}[/]"
    top = answer["emotion_top"][0] if answer.get("emotion_top") else None
    lines = [escape(answer["response"])]
    if top:
        lines.append(f"[dim]emotion: {top['label']} ({top['prob']:.2f})[/]")
    evidence = ", ".join(_evidence_text(e) for e in answer.get("evidence", [])[:3])
    if evidence:
        lines.append(f"[dim]evidence: {escape(evidence)}[/]")
    return "\n".join(lines)


def _evidence_text(e: dict) -> str:
    if "pair" in e:
        return f"{e['pair'][0]}~{e['pair'][1]}"
    return str(e.get("word", e))
