"""The papers' synthetic evaluations at their default budgets, for Transformer++, Titans MAC and
HOPE together (issue 21): MQAR, MAD and the formal languages, each model trained from scratch.

Each task runs as its `nestlearn eval <task>` command with that command's defaults (the sweep
sized to take about an hour here for the three tasks and three models), into
`--out-dir/<task>`; a stopped study resumes where it was, since every setting's result is saved
as it finishes. The table of every task is printed and written to `--json`, with the training
seconds each model spent per task (the sum of its settings' own timings, so a resumed study
reports the same figure as an uninterrupted one; comparable only between runs that had the
machine alone).

    python benchmarks/evaluation_suite.py                       # all three tasks
    python benchmarks/evaluation_suite.py --tasks formal --models transformer,hope
    python benchmarks/evaluation_suite.py --report              # the tables of what has finished
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from nestlearn import cli
from nestlearn.utils.io import atomic_write_json, read_json

TASKS = ("mqar", "mad", "formal")
MODELS = ("transformer", "titans_mac", "hope")


def stored(task: str, out_dir: Path) -> dict[str, Any] | None:
    """The task's results file (training settings and results), None before its first result."""
    path = out_dir / task / "eval" / f"{task}.json"
    return read_json(path) if path.exists() else None


def cells(task: str, r: dict[str, Any]) -> dict[str, float]:
    """One result's columns: MQAR accuracy per (length, width), MAD accuracy per task, and per
    language the share recognised in the training range and in the longest test bin."""
    if task == "mqar":
        return {f"T{r['seq_len']} d{r['width']}": r["accuracy"]}
    if task == "mad":
        return {r["task"]: r["accuracy"]}
    return {f"{r['language']} train": r["accuracy"][0], f"{r['language']} longest": r["accuracy"][-1]}


def table(task: str, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per model: its cells, their mean, non-finite runs and training seconds."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in found):
        mine = [r for r in found if r["model"] == model]
        scores: dict[str, float] = {}
        for r in mine:
            scores.update(cells(task, r))
        rows.append({"model": model, "scores": scores, "mean": statistics.fmean(scores.values()),
                     "non_finite": sum(not r["finite"] for r in mine),
                     "seconds": sum(float(r["seconds"]) for r in mine), "settings": len(mine)})
    return rows


def print_table(task: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(c for r in rows for c in r["scores"]))
    print(f"\n{task}")
    header = f"{'model':<14}" + "".join(f"{c[:18]:>19}" for c in columns) + f"{'mean':>7}{'seconds':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shown = "".join(f"{r['scores'][c]:>19.3f}" if c in r["scores"] else f"{'-':>19}" for c in columns)
        flag = f"  ({r['non_finite']} non-finite)" if r["non_finite"] else ""
        print(f"{r['model']:<14}{shown}{r['mean']:>7.3f}{r['seconds']:>9.0f}{flag}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"some of {', '.join(TASKS)}")
    p.add_argument("--models", default=",".join(MODELS), help="model types, comma-separated")
    p.add_argument("--out-dir", type=Path, default=Path("runs/eval_suite"))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/evaluation_suite.json"))
    p.add_argument("--report", action="store_true", help="print the tables of what has finished; train nothing")
    p.add_argument("--task-args", action="append", default=[], metavar="TASK=ARGS",
                   help="extra options for one task's command, e.g. 'mqar=--steps 500' (a setting other "
                        "than the defaults is a different study: give it its own --out-dir)")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(args.tasks) - set(TASKS)):
        p.error(f"--tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
    extra: dict[str, list[str]] = {}
    for item in args.task_args:
        task, sep, rest = item.partition("=")
        if not sep or task not in TASKS:
            p.error(f"--task-args {item!r}: expected TASK=ARGS with TASK one of {', '.join(TASKS)}")
        extra[task] = [*extra.get(task, []), *rest.split()]
    args.task_args = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for task in args.tasks if not args.report else []:
        print(f"== {task}", flush=True)
        code = cli.main(["eval", task, "--models", args.models, "--out-dir", str(args.out_dir / task),
                         *args.task_args.get(task, [])])
        if code != 0:
            return code
    blobs = {task: blob for task in args.tasks if (blob := stored(task, args.out_dir)) is not None}
    found = {task: table(task, blobs[task]["results"] if task in blobs else []) for task in args.tasks}
    for task, rows in found.items():
        print_table(task, rows)
    settings = {task: blob["training"] for task, blob in blobs.items()}
    atomic_write_json(args.json, {"settings": settings, "tables": found})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
