"""The busy-CPU notice: once, only when the steps got too little of their threads' CPU time."""

from __future__ import annotations

from nestlearn.train.cpu_share import CpuShareCheck


def run(threads: int, steps: list[tuple[float, float]]) -> list[str]:
    messages: list[str] = []
    check = CpuShareCheck(threads, messages.append, skip=2, steps=4)
    for wall, cpu in steps:
        check.step_done(wall, cpu)
    return messages


def test_warns_once_when_the_threads_get_a_fraction_of_the_cpu() -> None:
    busy = [(10.0, 1.0)] * 2 + [(1.0, 0.6)] * 10  # 2 threads, 30% of their time; first 2 skipped
    messages = run(2, busy)
    assert len(messages) == 1 and "30% of its 2 threads" in messages[0] and "train.threads=1" in messages[0]


def test_quiet_on_a_free_cpu_and_at_one_thread() -> None:
    assert run(2, [(1.0, 0.1)] * 2 + [(1.0, 1.9)] * 10) == []  # slow first steps are skipped
    assert run(1, [(1.0, 0.1)] * 12) == []

