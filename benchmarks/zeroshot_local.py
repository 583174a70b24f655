"""Zero-shot evaluation of trained runs on local tasks built from the default corpus's held-out
split, through lm-evaluation-harness and the ``nestlearn`` adapter: the harness's tasks need
the internet, these do not.

* ``stdlib_code_choice`` (multiple choice, acc): a held-out line of Python cut in two, after up
  to 400 characters of its file; is the real continuation (its next 6 tokens) or the same
  tokens reversed the one that follows? Same pieces, as many of them: a model that knows
  nothing of order is at chance.
* ``stdlib_val_ppl`` (rolling log-likelihood: word and byte perplexity, bits per byte): the
  first 4,000 characters of held-out files, scored in windows of the model's context.

    python benchmarks/zeroshot_local.py runs/quality/final_transformer_s0 runs/quality/final_hope_s0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from nestlearn.data.corpus import open_source, split_of
from nestlearn.eval.zeroshot import local_task_yaml, run_zeroshot
from nestlearn.generate import TextCodec
from nestlearn.loading import load
from nestlearn.utils.io import atomic_write_json


def held_out_files(val_fraction: float) -> list[str]:
    """Texts of the default corpus's validation split (the split `nestlearn prepare` makes)."""
    return [d.text for d in open_source("stdlib").documents() if split_of(d.doc_id, val_fraction) == "val"]


def choice_rows(texts: list[str], tokenizer: TextCodec, limit: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        offset = 0
        for line in lines:
            offset += len(line)
            if len(line) < 40 or not line.isascii() or len(rows) >= limit or rng.random() > 0.2:
                continue
            start = offset - len(line)
            cut = start + len(line) // 2
            real_ids = tokenizer.encode(text[cut:])[:6]
            real, fake = tokenizer.decode(real_ids), tokenizer.decode(real_ids[::-1])
            if fake == real or sorted(tokenizer.encode(fake)) != sorted(real_ids):
                continue
            label = rng.randrange(2)
            rows.append({"context": text[max(0, cut - 400):cut], "label": label,
                         "choices": [real, fake] if label == 0 else [fake, real]})
    return rows


def write_tasks(root: Path, tokenizer: TextCodec, val_fraction: float, limit: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    texts = held_out_files(val_fraction)
    rows = choice_rows(texts, tokenizer, limit)
    (root / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t[:4000]}) + "\n" for t in texts[:limit // 5]))
    (root / "stdlib_code_choice.yaml").write_text(
        local_task_yaml("stdlib_code_choice", root / "choice.jsonl", "multiple_choice"))
    (root / "stdlib_val_ppl.yaml").write_text(local_task_yaml("stdlib_val_ppl", root / "ppl.jsonl", "loglikelihood_rolling"))
    print(f"tasks: {len(rows)} choices, {min(len(texts), limit // 5)} files, in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or checkpoints)")
    p.add_argument("--tasks-dir", type=Path, default=Path("benchmarks/results/zeroshot_tasks"))
    p.add_argument("--limit", type=int, default=500, help="choice questions (files: a fifth of it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/zeroshot_local.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    first = load(args.runs[0])
    tasks = write_tasks(args.tasks_dir, first.tokenizer, first.config.data.val_fraction, args.limit)
    rows = []
    for run in args.runs:
        path, blob = run_zeroshot(run, "stdlib_code_choice,stdlib_val_ppl", batch_size=args.batch_size,
                                  include_path=tasks, device="cpu")
        m = blob["metrics"]
        rows.append({"run": str(run), "model": blob["model"], "results": str(path),
                     "acc": m["stdlib_code_choice"]["acc"], "bits_per_byte": m["stdlib_val_ppl"]["bits_per_byte"],
                     "word_perplexity": m["stdlib_val_ppl"]["word_perplexity"]})
    print(f"\n{'run':<44} {'model':<16} {'code choice acc':>20} {'bits/byte':>10} {'word ppl':>10}")
    for r in rows:
        acc = r["acc"]
        print(f"{r['run']:<44} {r['model']:<16} {acc['value']:>12.4f} ± {acc['stderr'] or 0:.4f} "
              f"{r['bits_per_byte']['value']:>10.4f} {r['word_perplexity']['value']:>10.2f}")
    atomic_write_json(args.out, {"tasks_dir": str(tasks), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
