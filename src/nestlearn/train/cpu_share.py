"""Notice a busy CPU. torch's CPU threads meet at a barrier after every operation, so when
other jobs take cores, each op waits for its slowest, descheduled thread: training at the
default thread count beside another job ran ~10x slower than at one thread. The share of its
threads' CPU time that the process gets during its training steps shows it."""

from __future__ import annotations

from collections.abc import Callable


class CpuShareCheck:
    """Warns once (through ``warn``) if the training steps ``skip + 1`` to ``skip + steps`` (the
    first ones may compile) got less than ``floor`` of their ``threads``' CPU time."""

    def __init__(self, threads: int, warn: Callable[[str], None], *, skip: int = 2, steps: int = 10,
                 floor: float = 0.5) -> None:
        self.threads, self.warn, self.skip, self.steps, self.floor = threads, warn, skip, steps, floor
        self.seen, self.wall, self.cpu = 0, 0.0, 0.0
        self.share: float | None = None

    def step_done(self, wall_s: float, cpu_s: float) -> None:
        """One training step took ``wall_s`` seconds and ``cpu_s`` of the process's CPU time."""
        self.seen += 1
        if self.threads < 2 or self.share is not None or self.seen <= self.skip:
            return
        self.wall, self.cpu = self.wall + wall_s, self.cpu + cpu_s
        if self.seen == self.skip + self.steps:
            self.share = self.cpu / (self.wall * self.threads) if self.wall > 0 else 1.0
            if self.share < self.floor:
                self.warn(f"warning: training got {self.share:.0%} of its {self.threads} threads' CPU "
                          "time: the CPU looks busy with other work, which can slow torch's threads "
                          "~10x; try train.threads=1 (or fewer threads than free cores)")
