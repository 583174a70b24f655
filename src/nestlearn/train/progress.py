"""Progress display for long work: a tqdm bar on a terminal, plain periodic lines elsewhere.

Lines instead of a bar keep CI logs readable (a bar redrawn into a file is noise); how often
they are printed is set by steps and seconds, and the clock can be injected for tests.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

from tqdm import tqdm

ProgressMode = Literal["auto", "bar", "lines", "none"]
_MODES = ("auto", "bar", "lines", "none")


def format_duration(seconds: float) -> str:
    """Compact durations for ETAs: "42s", "1m02s", "3h05m09s" ("?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


_RATE_KEYS = ("tokens_per_s", "tok_s")


def format_fields(fields: dict[str, Any]) -> list[str]:
    """Human-readable fields: loss and lr first, tokens/s with thousands separators."""
    parts: list[str] = []
    if "loss" in fields:
        parts.append(f"loss {fields['loss']:.4g}")
    if "lr" in fields:
        parts.append(f"lr {fields['lr']:.2e}")
    rate = next((fields[k] for k in _RATE_KEYS if k in fields), None)
    if rate is not None:
        parts.append(f"{rate:,.0f} tok/s")
    shown = ("loss", "lr", *_RATE_KEYS)
    parts += [f"{k} {_format_value(v)}" for k, v in fields.items() if k not in shown]
    return parts


class Progress:
    """Shows step, loss, lr, tokens/s and ETA of a loop from `initial` to `total_steps`.

    "auto" is a bar when stderr is a terminal, else "lines": a line on stdout whenever
    `every_steps` steps or `every_seconds` seconds have passed since the last one (0 disables
    either), and at the final step. "none" shows no progress; `write` still prints.
    """

    def __init__(
        self,
        total_steps: int,
        mode: ProgressMode = "auto",
        initial: int = 0,
        desc: str = "train",
        *,
        every_steps: int = 0,
        every_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(_MODES)}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.total = total_steps
        self.desc = desc
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._clock = clock
        self._start_time = clock()
        self._start_step = initial
        self._last_time = self._start_time
        self._last_step = initial
        self._pending: str | None = None
        self._bar: Any = None
        if mode == "bar":
            self._bar = tqdm(
                total=total_steps, initial=initial, desc=desc, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, **fields: Any) -> None:
        """Record that `step` is done; `fields` are shown (loss, lr, tokens_per_s, ...)."""
        if self.mode == "bar":
            self._bar.set_postfix_str(" | ".join(format_fields(fields)), refresh=False)
            self._bar.update(step - self._bar.n)  # redraws at most every tqdm.mininterval
        elif self.mode == "lines":
            now = self._clock()
            line = self._line(step, now, fields)
            if self._due(step, now):
                self._emit(line)
                self._last_step, self._last_time = step, now
            else:
                self._pending = line

    def _due(self, step: int, now: float) -> bool:
        # at multiples of every_steps (regular steps in a log, a resumed run included)
        by_steps = self.every_steps > 0 and step // self.every_steps > self._last_step // self.every_steps
        by_time = self.every_seconds > 0 and now - self._last_time >= self.every_seconds
        return by_steps or by_time or step >= self.total

    def _line(self, step: int, now: float, fields: dict[str, Any]) -> str:
        done = step - self._start_step
        elapsed = now - self._start_time
        eta = (self.total - step) * elapsed / done if done > 0 and elapsed > 0 else math.inf
        parts = [
            f"{self.desc} step {step}/{self.total}",
            *format_fields(fields),
            f"eta {format_duration(eta)}",
        ]
        return " | ".join(parts)

    def _emit(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)
        self._pending = None

    def write(self, msg: str) -> None:
        """Print a message (on stdout) without breaking the bar."""
        if self._bar is not None:
            tqdm.write(msg, file=sys.stdout)
        else:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        """Close the bar, or print the last update if it was held back by the rate limit."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.mode = "none"
        elif self._pending is not None:
            self._emit(self._pending)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
