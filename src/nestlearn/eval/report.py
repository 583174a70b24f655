"""The run report: `loss.png` and a self-contained `report.html` from a run directory.

Everything is read back from the files a run wrote (config.json, metrics.jsonl,
metrics.json, data_stats.json), so a report can be rebuilt for any finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from nestlearn.train.metrics import read_jsonl
from nestlearn.utils.io import atomic_write_bytes, atomic_write_text, read_json


def _curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    train = [(r["step"], r.get("loss_avg", r["loss"])) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    return {
        "train": ([s for s, _ in train], [v for _, v in train]),
        "val": ([s for s, _ in val], [v for _, v in val]),
    }


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_figure(fig: Any, plt: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_loss(records: list[dict[str, Any]], baseline: float | None, title: str) -> bytes | None:
    """PNG bytes of train/val loss against step, or None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    curves = _curves(records)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*curves["train"], label="train loss", lw=1.2)
    if curves["val"][0]:
        ax.plot(*curves["val"], "o-", label="validation loss", lw=1.5, ms=4)
    if baseline is not None:
        ax.axhline(baseline, ls="--", c="gray", lw=1, label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_figure(fig, plt)


def plot_comparison(runs: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """PNG bytes of every run's train (thin) and validation (dots) loss on one axis."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, (label, records) in enumerate(runs.items()):
        curves = _curves(records)
        color = f"C{i}"
        ax.plot(*curves["train"], color=color, lw=1, alpha=0.6, label=f"{label} train")
        if curves["val"][0]:
            ax.plot(*curves["val"], "o-", color=color, lw=1.5, ms=4, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("same data, same token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_figure(fig, plt)


def _comparison_section(run_dir: Path, others: list[Path]) -> str:
    """A table of final figures and an overlaid loss plot of this run and `others`."""
    if not others:
        return ""
    dirs = [run_dir, *others]
    names = [read_json(d / "config.json")["name"] for d in dirs]
    finals = [read_json(d / "metrics.json") for d in dirs]
    head = ("<tr><th>run</th><th>model</th><th>status</th><th>parameters</th><th>val loss</th>"
            "<th>val bpb</th><th>tokens/s</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(read_json(d / 'config.json')['model']['type'])}</td>"
        f"<td>{html.escape(_status(f))}</td>"
        f"<td>{_fmt(f.get('params', 0))}</td><td>{_fmt(f.get('val_loss', '-'))}</td>"
        f"<td>{_fmt(f.get('val_bpb', '-'))}</td><td>{_fmt(f.get('tokens_per_s', 0.0))}</td></tr>"
        for n, d, f in zip(names, dirs, finals, strict=True))
    png = plot_comparison({n: read_jsonl(d / "metrics.jsonl") for n, d in zip(names, dirs, strict=True)})
    figure = ""
    if png is not None:
        atomic_write_bytes(run_dir / "compare.png", png)
        figure = f'<img alt="loss curves of all runs" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    return f"<h2>Comparison</h2><table>{head}{rows}</table>{figure}"


def _status(final: dict[str, Any]) -> str:
    """`ok`, or `FAILED: why` for a run that diverged or ended with a non-finite loss."""
    return f"FAILED: {final['failed']}" if final.get("failed") else "ok"


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _samples_section(run_dir: Path) -> str:
    """The texts the trained model wrote (`samples.json`, written by `nestlearn run`)."""
    path = run_dir / SAMPLES_FILE
    if not path.exists():
        return ""
    blob = read_json(path)
    settings = html.escape(", ".join(f"{k} {v}" for k, v in blob["sampling"].items()))
    items = "".join(f"<pre><b>{html.escape(s['prompt'])}</b>{html.escape(s['text'])}</pre>"
                    for s in blob["samples"])
    return f"<h2>Samples</h2><p>{settings}; prompt in bold.</p>{items}"


def _zeroshot_section(run_dir: Path) -> str:
    """The zero-shot results (`nestlearn eval zeroshot`), if the run has them."""
    path = run_dir / ZEROSHOT_FILE
    if not path.exists():
        return ""
    blob = read_json(path)
    rows = "".join(
        f"<tr><td>{html.escape(task)}</td><td>{html.escape(name)}</td><td>{m['value']:.4f}</td>"
        f"<td>{_fmt(m['stderr']) if m['stderr'] is not None else ''}</td></tr>"
        for task, metrics in blob["metrics"].items() for name, m in metrics.items())
    limit = f", at most {blob['limit']:g} examples per task" if blob.get("limit") else ""
    return (f"<h2>Zero-shot</h2><p>lm-evaluation-harness {html.escape(blob['harness_version'])}, "
            f"checkpoint <code>{html.escape(blob['checkpoint'])}</code>{limit}.</p>"
            f"<table><tr><th>task</th><th>metric</th><th>value</th><th>stderr</th></tr>{rows}</table>")


def _niah_section(run_dir: Path) -> str:
    """The needle-in-a-haystack results (`nestlearn eval niah`): accuracy per task and length
    (mean over depths) and the length x depth heat-map, if the run has them."""
    path = run_dir / NIAH_FILE
    if not path.exists():
        return ""
    acc = read_json(path)["accuracy"]
    lengths = sorted({int(n) for per_task in acc.values() for n in per_task})
    head = "".join(f"<th>{n}</th>" for n in lengths)
    rows = "".join(
        f"<tr><td>{html.escape(task)}</td>" + "".join(
            f"<td>{sum(per[str(n)].values()) / len(per[str(n)]):.2f}</td>" if str(n) in per else "<td></td>"
            for n in lengths) + "</tr>"
        for task, per in acc.items())
    plot = run_dir / NIAH_PLOT
    figure = (f'<img alt="needle in a haystack" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
              if plot.exists() else "")
    return (f"<h2>Needle in a haystack</h2><p>Accuracy by context length in tokens (mean over depths).</p>"
            f"<table><tr><th>task</th>{head}</tr>{rows}</table>{figure}")


STUDIES = ("mqar", "mad", "formal", "continual")  # eval/<study>.json, with <study>.png


def study_files(directory: Path) -> list[Path]:
    """The results of `nestlearn eval mqar|mad|formal|continual` written under ``directory``."""
    return [p for p in (directory / "eval" / f"{s}.json" for s in STUDIES) if p.is_file()]


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return html.escape(", ".join(_cell(v) for v in value))
    return html.escape(_fmt(value))


def _study_sections(directory: Path) -> str:
    """One section per study result file: its results as a table (continual: the loss matrix
    and its metrics) and its plot."""
    parts = []
    for path in study_files(directory):
        blob = read_json(path)
        if blob["task"] == "continual":
            names = [s["name"] for s in blob["segments"]]
            rows = [{"after": "untrained", **dict(zip(names, blob["untrained"], strict=True))},
                    *({"after": n, **dict(zip(names, row, strict=True))}
                      for n, row in zip(names, blob["matrix"], strict=True))]
            note = _table(blob["metrics"])
        else:
            rows, note = blob["results"], ""
        keys = list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows)
        plot = path.with_suffix(".png")
        figure = (f'<img alt="{blob["task"]}" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
                  if plot.exists() else "")
        parts.append(f"<h2>{html.escape(blob['task'])}</h2><table><tr>{head}</tr>{body}</table>{note}{figure}")
    return "".join(parts)


def write_study_report(directory: Path) -> Path:
    """``report.html`` of a directory that holds only evaluation studies (e.g. ``runs/mad``)."""
    directory = Path(directory)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>nestlearn evaluations: {html.escape(directory.name)}</title><style>{STYLE}</style></head><body>
<h1>Evaluations in <code>{html.escape(str(directory))}</code></h1>
{_study_sections(directory)}
</body></html>
"""
    report = directory / "report.html"
    atomic_write_text(report, page)
    return report


def _source_rows(stats: dict[str, Any]) -> str:
    head = ("<tr><th>source</th><th>split</th><th>documents kept</th><th>characters</th>"
            "<th>tokens</th><th>dropped</th></tr>")
    body = []
    for name, source in stats.get("sources", {}).items():
        for split in ("train", "val"):
            s = source.get(split, {})
            dropped = ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items() if v) or "none"
            body.append(
                f"<tr><td>{html.escape(name)}</td><td>{split}</td>"
                f"<td>{_fmt(s.get('documents_kept', 0))}</td><td>{_fmt(s.get('characters', 0))}</td>"
                f"<td>{_fmt(s.get('tokens', 0))}</td><td>{html.escape(dropped)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


SAMPLES_FILE = "samples.json"
ZEROSHOT_FILE = Path("eval") / "zeroshot.json"  # written by eval.zeroshot
NIAH_FILE = Path("eval") / "niah.json"  # written by eval.niah, with its heat-map:
NIAH_PLOT = Path("eval") / "niah.png"
STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
th{background:#f5f5f5}pre{background:#f8f8f8;padding:1rem;overflow:auto;font-size:.85rem}img{max-width:100%}"""


def write_report(run_dir: Path, compare: list[Path] | None = None) -> Path:
    """Write `loss.png` and `report.html` into `run_dir`; returns the report's path.

    `compare`: run directories trained on the same data and budget (`run --compare`), shown
    side by side with this one (`compare.png` and a table of final figures).
    """
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    final = read_json(run_dir / "metrics.json")
    records = read_jsonl(run_dir / "metrics.jsonl")
    stats_path = run_dir / "data_stats.json"
    stats = read_json(stats_path) if stats_path.exists() else {}
    baseline = stats.get("unigram_entropy_nats")
    png = plot_loss(records, baseline, f"{config['name']} ({config['model']['type']})")
    if png is not None:
        atomic_write_bytes(run_dir / "loss.png", png)
        figure = f'<img alt="loss curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    else:
        figure = "<p>Install the <code>report</code> extra (matplotlib) for loss plots.</p>"
    figures = ("val_loss", "val_ppl", "val_bpb", "best_val_loss", "step", "tokens", "tokens_per_s",
               "train_time_s", "params")
    headline = {"status": _status(final), **{k: final[k] for k in figures if k in final}}
    if baseline is not None:
        headline["unigram_entropy_nats"] = baseline
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>nestlearn report: {html.escape(config['name'])}</title><style>{STYLE}</style></head><body>
<h1>Run <code>{html.escape(config['name'])}</code></h1>
<p>Model <b>{html.escape(config['model']['type'])}</b>; run directory <code>{html.escape(str(run_dir))}</code>.</p>
<h2>Final figures</h2>{_table(headline)}
<h2>Loss</h2>{figure}
{_comparison_section(run_dir, compare or [])}
{_samples_section(run_dir)}
{_zeroshot_section(run_dir)}
{_niah_section(run_dir)}
{_study_sections(run_dir)}
<h2>Data</h2>{_source_rows(stats)}
<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>
</body></html>
"""
    report = run_dir / "report.html"
    atomic_write_text(report, page)
    return report
