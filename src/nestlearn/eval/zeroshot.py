"""Zero-shot evaluation through lm-evaluation-harness (extra ``eval``): the model adapter
``nestlearn`` (registered on import of this module) and ``run_zeroshot``, which evaluates a
trained run on the harness's tasks and writes ``<run>/eval/zeroshot.json``.

The harness's CLI finds the adapter once this module is imported:
``python -m nestlearn.eval.zeroshot --model nestlearn --model_args pretrained=RUN_DIR --tasks
piqa`` is ``lm_eval`` with it registered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nestlearn.config.loader import to_dict
from nestlearn.eval.report import ZEROSHOT_FILE
from nestlearn.eval.scoring import Scorer
from nestlearn.loading import LoadedModel, checkpoint_run_dir, load_run_or_export
from nestlearn.utils.io import atomic_write_json

# The paper's zero-shot set (arXiv 2512.24695, its language-modelling table): the harness's
# own task names. They download their datasets, so they need the internet once.
PAPER_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy",
               "arc_challenge", "social_iqa", "boolq")


_TASK_HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
_TASK_BODY = {
    "multiple_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "loglikelihood_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


def local_task_yaml(name: str, data: Path, output_type: str) -> str:
    """A harness task YAML over a local JSONL file (for ``--include-path``): ``multiple_choice``
    reads records {context, choices, label}, ``loglikelihood_rolling`` records {text}."""
    if output_type not in _TASK_BODY:
        raise ValueError(f"output_type {output_type!r}: expected one of {', '.join(_TASK_BODY)}")
    return _TASK_HEAD.format(name=name, data=data) + _TASK_BODY[output_type]


@register_model("nestlearn")
class NestlearnLM(LM):  # type: ignore[misc]  # lm_eval is untyped
    """A nestlearn model for the harness. ``pretrained``: a run directory, a checkpoint or a
    directory `nestlearn export --hf` wrote;
    ``max_length``: the scoring window (default: the sequence length the model was trained
    on, ``train.seq_len``: past it a model is off its training distribution, and a HOPE smoke
    model's memory diverges in context, docs/results.md)."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", batch_size: int | str = 1,
                 max_length: int | None = None, loaded: LoadedModel | None = None, **_: Any) -> None:
        super().__init__()
        if loaded is None:
            if pretrained is None:
                raise ValueError("the nestlearn model needs pretrained=RUN_DIR (or a checkpoint directory)")
            loaded = load_run_or_export(pretrained, device)
        self.loaded = loaded
        window = max_length or loaded.config.train.seq_len
        self.scorer = Scorer(loaded.model, loaded.tokenizer, int(window), _batch(batch_size))

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until([(r.args[0], dict(r.args[1])) for r in requests])


def _batch(value: int | str) -> int:
    if str(value).startswith("auto"):
        return 8  # no memory probing: windows are short and batches of equal length
    return int(value)


def task_list(tasks: str) -> list[str]:
    """``paper`` (``PAPER_TASKS``) or a comma-separated list of the harness's task names."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    expanded = [n for t in names for n in (PAPER_TASKS if t == "paper" else (t,))]
    if not expanded:
        raise ValueError(f"--tasks {tasks!r} names no task; give task names or 'paper'")
    return list(dict.fromkeys(expanded))


def run_zeroshot(path: str | Path, tasks: str, *, limit: float | None = None, batch_size: int = 1,
                 device: str = "cpu", include_path: str | Path | None = None, max_length: int | None = None,
                 out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate a run (its newest valid checkpoint) on ``tasks``; writes the metrics with their
    standard errors, the model, checkpoint, config and harness version to ``out`` (default:
    ``<run>/eval/zeroshot.json``) and returns its path and content."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    loaded = load_run_or_export(path, device)
    adapter = NestlearnLM(loaded=loaded, batch_size=batch_size, max_length=max_length)
    names = task_list(tasks)
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not in lm-evaluation-harness "
                         f"{lm_eval.__version__} nor under --include-path")
    results = simple_evaluate(model=adapter, tasks=names, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=1000)
    if results is None:
        raise RuntimeError("lm-evaluation-harness returned no results")
    run_dir = checkpoint_run_dir(loaded.checkpoint) or loaded.checkpoint
    blob = {
        "model": loaded.config.model.type, "checkpoint": str(loaded.checkpoint),
        "config": to_dict(loaded.config), "harness_version": lm_eval.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "limit": limit,
        "max_length": adapter.scorer.max_length,
        "tasks": names, "metrics": {task: _metrics(m) for task, m in results["results"].items()},
    }
    target = out if out is not None else run_dir / ZEROSHOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, blob)
    return target, blob


def _metrics(raw: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The harness's ``"acc,none": 0.5, "acc_stderr,none": 0.1`` as ``{"acc": {"value", "stderr"}}``."""
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in raw.items():
        name, _, _filter = key.partition(",")
        if not _ or name.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = raw.get(f"{name}_stderr,{_filter}")
        metrics[name] = {"value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr)
                         else None}
    return metrics


if __name__ == "__main__":  # the harness's own CLI, with the adapter registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
