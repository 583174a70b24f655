"""The `nestlearn` command: argument parsing only; the work is in `nestlearn.pipeline`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nestlearn import __version__

DEFAULT_CONFIG = "hope/pilot_smoke"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlearn", description="Nested Learning in PyTorch: data, training, evaluation.")
    parser.add_argument("--version", action="version", version=f"nestlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, resume: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config-name", "-c", default=DEFAULT_CONFIG,
                       help=f"config under configs/ (default: {DEFAULT_CONFIG})")
        p.add_argument("--config-path", type=Path, default=None,
                       help="an extra directory searched first for configs")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="overrides such as train.steps=200 data.sources=[a.txt,b.txt]")
        if resume:
            p.add_argument("--resume", default="auto",
                           help="auto (newest valid checkpoint of the run, default), none, or a "
                                "checkpoint directory")
        return p

    run = add("run", "the main job: prepare data, train, evaluate, write the report", resume=True)
    run.add_argument("--compare", default=None, metavar="A,B",
                     help="also train these model types or configs on the same data and token "
                          "budget and compare them in the report (e.g. transformer,titans_mac; "
                          f"default: transformer for {DEFAULT_CONFIG}, else none; 'none': none)")
    add("prepare", "prepare the tokenizer and token shards only")
    add("train", "train (and evaluate) a model; no report", resume=True)
    add("config", "print the resolved config as JSON")
    report = sub.add_parser("report", help="rebuild the report of a finished run directory")
    report.add_argument("run_dir", type=Path)
    _add_sample(sub)
    _add_eval(sub)
    export = sub.add_parser("export", help="convert a trained run to a Hugging Face model directory")
    export.add_argument("run_dir", type=Path, help="a run directory or one checkpoint directory")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR",
                        help="the directory to write (replaced as a whole if it exists)")
    sub.add_parser("configs", help="list the configs that --config-name accepts")
    sub.add_parser("models", help="list the registered model types")
    sub.add_parser("doctor", help="versions, device, threads, C++ kernels, default corpus")
    return parser


def _add_sample(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "write text with a trained model (the run's newest valid checkpoint and tokenizer)"
    p = sub.add_parser("sample", help=text, description=text)
    p.add_argument("run_dir", type=Path, help="a run directory or one checkpoint directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="keep the smallest set of tokens with this much probability (1: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end at this text (repeatable; not printed)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def _sample(args: argparse.Namespace) -> int:
    from nestlearn.generate import SamplingConfig, generate
    from nestlearn.loading import load

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop))
    loaded = load(args.run_dir, device=args.device)
    print(f"# {loaded.checkpoint} ({loaded.config.model.type})", file=sys.stderr)
    trained = loaded.config.train.seq_len
    if len(loaded.tokenizer.encode(args.prompt)) + args.max_new_tokens > trained:
        print(f"# note: prompt + --max-new-tokens passes the {trained} tokens this model was trained on; "
              "past them it is off its training distribution (a HOPE memory can diverge)", file=sys.stderr)
    sys.stdout.write(args.prompt)
    generate(loaded.model, loaded.tokenizer, args.prompt, sampling, on_text=_write)
    sys.stdout.write("\n")
    return 0


def _add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="evaluate a trained run")
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    text = "zero-shot tasks of lm-evaluation-harness (extra: eval)"
    z = kinds.add_parser("zeroshot", help=text, description=text)
    z.add_argument("run_dir", type=Path, help="a run directory or one checkpoint directory")
    z.add_argument("--tasks", default="paper",
                   help="harness task names, comma-separated, or 'paper' (default): the paper's set")
    z.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction if < 1); for quick checks only")
    z.add_argument("--batch-size", type=int, default=1)
    z.add_argument("--max-length", type=int, default=None,
                   help="the scoring window in tokens (default: the run's train.seq_len)")
    z.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    z.add_argument("--include-path", type=Path, default=None,
                   help="a directory of task YAMLs of your own (the harness's option)")
    z.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/eval/zeroshot.json")
    text = "needle in a haystack: RULER's single-needle tasks on the default corpus"
    n = kinds.add_parser("niah", help=text, description=text)
    n.add_argument("run_dir", type=Path, help="a run directory, a checkpoint directory or an exported HF directory")
    n.add_argument("--tasks", default="s_niah_1,s_niah_2,s_niah_3", help="comma-separated (default: all three)")
    n.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                   help="prompt lengths in tokens, comma-separated")
    n.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated")
    n.add_argument("--samples", type=int, default=2, help="prompts per task, length and depth")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--piece", type=int, default=2048, help="tokens read per call while reading a prompt")
    n.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    n.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/eval/niah.json (+ .png)")
    text = "in-context recall (MQAR): train small models of each type from scratch, sweep length and width"
    m = kinds.add_parser("mqar", help=text, description=text)
    m.add_argument("--models", default="transformer,hope_attention,titans_mac,hope", help="model types")
    m.add_argument("--seq-lens", default="64,128,256", help="sequence lengths, comma-separated")
    m.add_argument("--widths", default="64,128,256", help="model widths, comma-separated")
    m.add_argument("--num-pairs", type=int, default=None, help="key-value pairs (default: seq_len / 16)")
    m.add_argument("--vocab-size", type=int, default=8192)
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out-dir", type=Path, default=Path("runs/mqar"),
                   help="results go to OUT_DIR/eval/mqar.json (+ .png); a rerun resumes")
    text = "MAD's six synthetic tasks: train small models of each type from scratch"
    d = kinds.add_parser("mad", help=text, description=text)
    _from_scratch_options(d, "mad")
    d.add_argument("--tasks", default="in_context_recall,fuzzy_in_context_recall,noisy_in_context_recall,"
                   "selective_copying,compression,memorization", help="MAD tasks, comma-separated (default: all)")
    d.add_argument("--max-seq-len", type=int, default=64, help="cap on the published sequence lengths")
    d.add_argument("--test-examples", type=int, default=256, help="cap on the published test set sizes")
    d.add_argument("--full", action="store_true",
                   help="the published settings, uncapped (with --width 128: MAD's; for a GPU)")
    text = ("continual learning: train one model on data segments in turn (default: stdlib packages "
            "email, asyncio, tkinter, multiprocessing, xml), evaluate on all after each")
    c = kinds.add_parser("continual", help=text, description=text)
    c.add_argument("--config-name", "-c", default=DEFAULT_CONFIG,
                   help=f"the run's config (model, optimizer, train.steps per segment; default: {DEFAULT_CONFIG})")
    c.add_argument("--config-path", type=Path, default=None, help="an extra directory searched first for configs")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=200")
    c.add_argument("--segments", type=Path, default=None,
                   help="YAML: segments: [{name: ..., sources: [...]}, ...] (default: the five stdlib packages)")
    c.add_argument("--val-fraction", type=float, default=0.2, help="share of each segment's files held out")
    c.add_argument("--reset-optimizer", action="store_true",
                   help="a fresh optimizer state per segment (default: it carries over)")
    text = "formal languages: train small models on short strings, test on longer ones"
    f = kinds.add_parser("formal", help=text, description=text)
    _from_scratch_options(f, "formal")
    f.add_argument("--languages", default="parity,aa_star,abab_star,anbn,anbncn,shuffle2",
                   help="languages, comma-separated (default: all)")
    f.add_argument("--test-examples", type=int, default=100, help="strings per length bin")


def _from_scratch_options(p: argparse.ArgumentParser, task: str) -> None:
    """The options every evaluation that trains its own small models takes."""
    p.add_argument("--models", default="transformer,titans_mac,hope", help="model types, comma-separated")
    p.add_argument("--width", type=int, default=64, help="model width (d_model)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path(f"runs/{task}"),
                   help=f"results go to OUT_DIR/eval/{task}.json (+ .png); a rerun resumes")


def _eval(args: argparse.Namespace) -> int:
    if args.eval_kind == "niah":
        return _niah(args)
    if args.eval_kind == "mqar":
        return _mqar(args)
    if args.eval_kind in ("mad", "formal"):
        return _mad_or_formal(args)
    if args.eval_kind == "continual":
        return _continual(args)
    try:
        from nestlearn.eval.zeroshot import run_zeroshot
    except ImportError as exc:
        raise RuntimeError(f"zero-shot evaluation needs the eval extra ({exc}); "
                           'pip install -e ".[eval]"') from exc
    path, blob = run_zeroshot(args.run_dir, args.tasks, limit=args.limit, batch_size=args.batch_size,
                              device=args.device, include_path=args.include_path, max_length=args.max_length,
                              out=args.out)
    for task, metrics in blob["metrics"].items():
        shown = ", ".join(f"{name} {m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")
                          for name, m in metrics.items())
        print(f"{task}: {shown}")
    print(f"results: {path}")
    return 0


def _numbers(value: str, kind: type[int] | type[float], option: str) -> tuple[Any, ...]:
    """A comma-separated list of numbers, or a one-line error naming the option."""
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {value!r}: expected comma-separated {kind.__name__}s") from None


def _niah(args: argparse.Namespace) -> int:
    from nestlearn.eval.niah import NiahSettings, evaluate_run

    settings = NiahSettings(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                            lengths=_numbers(args.lengths, int, "--lengths"),
                            depths=_numbers(args.depths, float, "--depths"), samples=args.samples,
                            seed=args.seed, piece=args.piece)
    path, blob = evaluate_run(args.run_dir, settings, device=args.device, out=args.out)
    for task, per_length in blob["accuracy"].items():
        shown = ", ".join(f"{n}: {sum(d.values()) / len(d):.2f}" for n, d in per_length.items())
        print(f"{task}: {shown}")
    print(f"results: {path}")
    return 0


def _mqar(args: argparse.Namespace) -> int:
    from nestlearn.eval.mqar_train import MQARSweep, sweep_and_save

    sweep = MQARSweep(models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                      seq_lens=_numbers(args.seq_lens, int, "--seq-lens"), widths=_numbers(args.widths, int, "--widths"),
                      num_pairs=args.num_pairs, vocab_size=args.vocab_size, steps=args.steps, batch=args.batch,
                      lr=args.lr, seed=args.seed)
    path, blob = sweep_and_save(sweep, args.out_dir)
    for r in blob["results"]:
        print(f"{r['model']:<16} T={r['seq_len']:<5} d={r['width']:<5} pairs={r['num_pairs']:<3} "
              f"accuracy {r['accuracy']:.3f}{'' if r['finite'] else '  (non-finite loss)'}")
    print(f"results: {path}")
    return 0


def _continual(args: argparse.Namespace) -> int:
    from nestlearn.config import load_config
    from nestlearn.eval.continual import DEFAULT_SEGMENTS, read_segments, run_continual

    cfg = load_config(args.config_name, args.overrides, args.config_path)
    segments = DEFAULT_SEGMENTS if args.segments is None else read_segments(args.segments)
    path, blob = run_continual(cfg, segments, args.reset_optimizer, args.val_fraction)
    print(" ".join(f"{name} {value:.4f}" for name, value in blob["metrics"].items()))
    print(f"results: {path}")
    return 0


def _mad_or_formal(args: argparse.Namespace) -> int:
    from nestlearn.eval import formal_train, mad_train

    names = tuple(m.strip() for m in args.models.split(",") if m.strip())
    shared = {"models": names, "width": args.width, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "seed": args.seed, "test_examples": args.test_examples}
    if args.eval_kind == "mad":
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        path, blob = mad_train.sweep_and_save(
            mad_train.MADSweep(tasks=tasks, max_seq_len=args.max_seq_len, full=args.full, **shared), args.out_dir)
        for r in blob["results"]:
            print(f"{r['model']:<16} {r['task']:<26} T={r['seq_len']:<4} accuracy {r['accuracy']:.3f}"
                  f"{'' if r['finite'] else '  (non-finite loss)'}")
    else:
        languages = tuple(t.strip() for t in args.languages.split(",") if t.strip())
        path, blob = formal_train.sweep_and_save(formal_train.FormalSweep(languages=languages, **shared), args.out_dir)
        for r in blob["results"]:
            scores = "  ".join(f"{a}-{b}: {x:.2f}" for (a, b), x in zip(r["bins"], r["accuracy"], strict=True))
            print(f"{r['model']:<16} {r['language']:<10} {scores}{'' if r['finite'] else '  (non-finite loss)'}")
    print(f"results: {path}")
    return 0


def _write(piece: str) -> None:
    """Streams generated text as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def _compare(value: str | None, config_name: str) -> str:
    """The `--compare` entries: by default the default HOPE run is shown beside the
    Transformer++ baseline trained on the same tokens (it takes about a minute)."""
    if value is None:
        return "transformer" if config_name == DEFAULT_CONFIG else ""
    return "" if value.lower() == "none" else value


def _main_process() -> bool:
    """False on the ranks other than 0 of a `torchrun` job, which print nothing."""
    return os.environ.get("RANK", "0") == "0"


def _resume(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with KEY=VALUE overrides allowed after options too
    (``nestlearn run name=x --resume none train.steps=5``)."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extras):
        args.overrides += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:  # the reader went away (`nestlearn config | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; every checkpoint written so far is complete: --resume auto continues from "
              "the newest (with none yet, the run starts over)", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        # Config, data and checkpoint errors are written as one self-explaining line.
        print(f"nestlearn: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from nestlearn import config, pipeline
    from nestlearn.config.loader import dumps

    if args.command == "configs":
        print("\n".join(config.available_configs()))
        from nestlearn.config.loader import NOT_RUN_CONFIGS, other_yaml

        for name in other_yaml():
            print(f"# not for -c: {name} is {NOT_RUN_CONFIGS[name.split('/')[0]]}", file=sys.stderr)
        return 0
    if args.command == "models":
        from nestlearn import models

        print("\n".join(models.available()))
        return 0
    if args.command == "doctor":
        from nestlearn import doctor

        return doctor.main()
    if args.command == "sample":
        return _sample(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        try:
            from nestlearn.hf import export_run
        except ImportError as exc:
            raise RuntimeError(f"export needs the hf extra ({exc}); pip install -e \".[hf]\"") from exc
        print(f"exported: {export_run(args.run_dir, args.hf)}")
        return 0
    if args.command == "report":
        from nestlearn.eval.report import study_files, write_report, write_study_report

        if (args.run_dir / "config.json").is_file():
            print(write_report(args.run_dir))
        elif study_files(args.run_dir):
            print(write_study_report(args.run_dir))
        else:
            raise ValueError(f"{args.run_dir} is neither a run directory (no config.json in it) nor one of "
                             "evaluation results (eval/<mqar|mad|formal|continual>.json); give the directory "
                             "`nestlearn run`, `train` or `eval` wrote, e.g. runs/<name>")
        return 0
    cfg = config.load_config(args.config_name, args.overrides, args.config_path)
    from nestlearn.models.registry import check_type

    check_type(cfg.model.type)  # before any data is prepared
    if args.command == "config":
        print(dumps(cfg))
        return 0
    if args.command == "prepare":
        data = pipeline.prepare(cfg)
        print(f"prepared data in {data.root} (tokenizer {data.tokenizer_path})")
        return 0
    if args.command == "train":
        run_dir, final = pipeline.train(cfg, pipeline.prepare(cfg), _resume(args.resume))
        if (reason := pipeline.failure(final)) is not None:
            print(f"nestlearn: error: run {cfg.name} failed: {reason}; run directory {run_dir}",
                  file=sys.stderr)
            return 1
        if _main_process():
            print(f"trained: val_loss {final['val_loss']:.4f}; run directory {run_dir}")
        return 0
    entries = [e.strip() for e in _compare(args.compare, args.config_name).split(",") if e.strip()]
    compare = pipeline.comparison_configs(cfg, args.config_name, entries, args.overrides,
                                          args.config_path)
    report, failures = pipeline.run(cfg, _resume(args.resume), compare=compare)
    if _main_process():
        print(f"report: {report}")
    if failures:
        print(f"nestlearn: error: {len(failures)} run(s) failed: {'; '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0
