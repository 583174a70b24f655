"""Needle in a haystack: RULER's three single-needle tasks (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?"), offline, on the default corpus.

    s_niah_1   noise haystack (one sentence repeated)        key: words, value: a 7-digit number
    s_niah_2   corpus haystack (held-out default-corpus files) key: words, value: a 7-digit number
    s_niah_3   corpus haystack                                key: words, value: a UUID

As in RULER: the needle "One of the special magic {numbers} for {key} is: {value}." goes into
the haystack at a sentence boundary, the prompt asks "What is the special magic {number} for
{key} mentioned in the provided text?" and ends with the answer prefix "The special magic
{number} for {key} mentioned in the provided text is"; the model continues greedily and
scores 1 when the value appears in what it writes (RULER's ``string_match_all``, one value).
Where we depart, and why: RULER's essay haystack is Paul Graham's essays, a download; ours is
the default corpus's validation files (Python source) joined by newlines, and a "sentence" is
a line. The needle's depth is swept on a grid (RULER samples it), so that the result is a
length × depth map. Lengths are exact in tokens: the prompt is assembled in token space
(header, haystack lines, the needle line, question), the haystack cut to fill it. Generation
stops at a newline (the answers are one line; RULER generates up to 128 tokens). The prompt
is read in pieces carrying the model's state, so the recurrent models' memory stays flat in
length.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from nestlearn.config.loader import to_dict
from nestlearn.config.schema import DEFAULT_CORPUS
from nestlearn.data.corpus import open_source, split_of
from nestlearn.eval.report import NIAH_FILE, NIAH_PLOT, png_figure, pyplot
from nestlearn.generate import SamplingConfig, TextCodec, read_prompt, sample_ids
from nestlearn.loading import checkpoint_run_dir, load_run_or_export
from nestlearn.models.base import LanguageModel
from nestlearn.train.progress import Progress
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
HEADER = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the {kind} afterwards.\n")
QUESTION = ("What is the special magic {kind} for {key} mentioned in the provided text? "
            "The special magic {kind} for {key} mentioned in the provided text is")
# keys: adjective-noun pairs, as RULER's (its lists come from the wonderwords package)
ADJECTIVES = ("amber", "bold", "brisk", "calm", "clever", "crisp", "dusty", "eager", "faint", "fierce",
              "gentle", "glossy", "hollow", "humble", "icy", "jolly", "keen", "lively", "lofty", "mellow",
              "misty", "noble", "odd", "pale", "quiet", "rapid", "rustic", "shy", "silent", "sturdy",
              "tidy", "vivid", "wary", "witty", "young", "zesty")
NOUNS = ("anchor", "badger", "beacon", "cactus", "canyon", "comet", "dagger", "falcon", "fern", "garnet",
         "glacier", "harbor", "heron", "island", "jackal", "kettle", "lantern", "meadow", "mirror", "nectar",
         "otter", "parcel", "pebble", "quarry", "raven", "saddle", "spindle", "thistle", "tunnel", "urchin",
         "valley", "walrus", "willow", "yarrow", "zephyr", "orchard")

Haystack = Literal["noise", "corpus"]
Value = Literal["numbers", "uuids"]


@dataclass(frozen=True)
class NiahTask:
    """One of RULER's single-needle tasks: its haystack, its value type and how many tokens a
    greedy answer may take (a UUID is ~25 tokens of our code tokenizer, a number ~7)."""

    haystack: Haystack
    value: Value
    max_new_tokens: int


TASKS: dict[str, NiahTask] = {
    "s_niah_1": NiahTask("noise", "numbers", 16),
    "s_niah_2": NiahTask("corpus", "numbers", 16),
    "s_niah_3": NiahTask("corpus", "uuids", 48),
}
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class NiahExample:
    """A prompt of exactly ``length`` tokens with one needle; ``needle_at``: the token index
    where the needle's line starts; ``depth``: where it was asked for (0 = first line of the
    haystack, 1 = after its last)."""

    task: str
    length: int
    depth: float
    key: str
    answer: str
    ids: list[int]
    needle: list[int]
    needle_at: int


def random_value(kind: Value, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def noise_lines() -> Iterator[str]:
    while True:
        yield NOISE


def corpus_lines(val_fraction: float = 0.05) -> Iterator[str]:
    """The default corpus's validation files, line by line, over and over (a haystack of any
    length; a model trained with this split has not seen them)."""
    docs = [d for d in open_source(DEFAULT_CORPUS).documents() if split_of(d.doc_id, val_fraction) == "val"]
    if not docs:
        raise ValueError(f"the default corpus has no validation files at val_fraction {val_fraction}")
    while True:
        for doc in docs:
            yield from (line for line in doc.text.splitlines() if line.strip())


def make_example(task: str, length: int, depth: float, codec: TextCodec, lines: Iterator[str],
                 rng: random.Random) -> NiahExample:
    """One prompt: the header, haystack lines cut to fill ``length`` tokens exactly, the needle
    as its own line at the line boundary nearest ``depth`` of the haystack, the question."""
    spec = TASKS[task]
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    kind = spec.value[:-1]
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    answer = random_value(spec.value, rng)
    newline = codec.encode("\n")
    head = codec.encode(HEADER.format(kind=kind))
    needle = codec.encode(NEEDLE.format(kinds=spec.value, key=key, value=answer)) + newline
    tail = newline + codec.encode(QUESTION.format(kind=kind, key=key))
    room = length - len(head) - len(needle) - len(tail)
    if room < 1:
        raise ValueError(f"length {length} leaves no room for a haystack: the prompt without one takes "
                         f"{length - room} tokens")
    hay: list[int] = []
    starts = [0]  # token offsets of the haystack's line starts
    while len(hay) < room:
        hay += codec.encode(next(lines)) + newline
        starts.append(len(hay))
    hay = hay[:room]
    starts = [s for s in starts if s <= room]
    at = min(starts, key=lambda s: abs(s - depth * room))
    ids = head + hay[:at] + needle + hay[at:] + tail
    return NiahExample(task, length, depth, key, answer, ids, needle, len(head) + at)


def score(prediction: str, answer: str) -> float:
    """RULER's string match: 1 when the answer appears in the prediction (case-insensitive)."""
    return float(answer.lower() in prediction.lower())


@torch.no_grad()
def answer(model: LanguageModel, codec: TextCodec, ids: Sequence[int], max_new_tokens: int, piece: int = 2048) -> str:
    """The greedy continuation of ``ids`` up to a newline or ``max_new_tokens``; the prompt is
    read ``piece`` tokens at a time carrying the state."""
    device = next(model.parameters()).device
    prompt = torch.tensor([list(ids)], device=device)
    state = read_prompt(model, prompt[:, :-1], piece)
    out: list[int] = []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    for token in sample_ids(model, prompt[:, -1:], sampling, state):
        t = int(token[0])
        if t == codec.eos_id:
            break
        out.append(t)
        if "\n" in codec.decode(out):
            break
    return codec.decode(out).split("\n")[0]


@dataclass(frozen=True)
class NiahSettings:
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = LENGTHS
    depths: tuple[float, ...] = DEPTHS
    samples: int = 2
    seed: int = 0
    piece: int = 2048

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown NIAH task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be >= 64 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {list(self.depths)}")
        if self.samples < 1 or self.piece < 1:
            raise ValueError(f"samples and piece must be >= 1, got {self.samples} and {self.piece}")


def run_niah(model: LanguageModel, codec: TextCodec, settings: NiahSettings,
             on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every task × length × depth × sample, in that order; returns the settings, each
    example's result and the accuracy per task, length and depth."""
    settings.check()
    rows: list[dict[str, Any]] = []
    for task in settings.tasks:
        spec = TASKS[task]
        lines = noise_lines() if spec.haystack == "noise" else corpus_lines()
        rng = random.Random(f"{settings.seed}:{task}")
        for length in settings.lengths:
            for depth in settings.depths:
                for sample in range(settings.samples):
                    ex = make_example(task, length, depth, codec, lines, rng)
                    prediction = answer(model, codec, ex.ids, spec.max_new_tokens, settings.piece)
                    row = {"task": task, "length": length, "depth": depth, "sample": sample, "key": ex.key,
                           "answer": ex.answer, "prediction": prediction, "correct": score(prediction, ex.answer)}
                    rows.append(row)
                    if on_result is not None:
                        on_result(row)
    return {"settings": dataclasses.asdict(settings), "results": rows, "accuracy": accuracy(rows)}


def accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean score per task, length and depth (keys as strings, for JSON)."""
    cells: dict[tuple[str, int, float], list[float]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"], r["depth"]), []).append(r["correct"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (task, length, depth), scores in cells.items():
        out.setdefault(task, {}).setdefault(str(length), {})[f"{depth:g}"] = sum(scores) / len(scores)
    return out


def heatmap(blob: dict[str, Any]) -> bytes | None:
    """Accuracy as a length × depth map per task (PNG), or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    acc = blob["accuracy"]
    tasks = list(acc)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lengths = list(acc[task])
        depths = list(acc[task][lengths[0]])
        grid = [[acc[task][length][d] for length in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{int(x) // 1024}k" if int(x) >= 1024 else x for x in lengths])
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(task)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
        fig.colorbar(image, ax=ax, label="accuracy")
    fig.suptitle(f"needle in a haystack: {blob.get('model', '')}")
    return png_figure(fig, plt)


def evaluate_run(path: str | Path, settings: NiahSettings, *, device: str = "auto",
                 out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate a run (its newest valid checkpoint) or an exported HF directory; writes the
    results to ``out`` (default ``<run>/eval/niah.json``) and the heat-map beside it (``.png``),
    with a progress display; returns the JSON's path and content."""
    settings.check()
    loaded = load_run_or_export(path, device)
    total = len(settings.tasks) * len(settings.lengths) * len(settings.depths) * settings.samples
    progress = Progress(total, desc="niah", every_seconds=30.0)
    done: list[float] = []

    def on_result(row: dict[str, Any]) -> None:
        done.append(row["correct"])
        progress.update(len(done), task=row["task"], length=row["length"], accuracy=sum(done) / len(done))

    result = run_niah(loaded.model, loaded.tokenizer, settings, on_result)
    progress.close()
    run_dir = checkpoint_run_dir(loaded.checkpoint) or loaded.checkpoint
    blob = {"model": loaded.config.model.type, "checkpoint": str(loaded.checkpoint),
            "config": to_dict(loaded.config), "train_seq_len": loaded.config.train.seq_len,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **result}
    target = out if out is not None else run_dir / NIAH_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, blob)
    png = heatmap(blob)
    if png is not None:
        atomic_write_bytes(target.with_suffix(".png") if out is not None else run_dir / NIAH_PLOT, png)
    return target, blob
