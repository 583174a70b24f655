"""``utils.compiling``: inductor's expected proxy-executor fallback warnings are dropped from the
logs, and only those."""

from __future__ import annotations

import logging

import pytest

from nestlearn.utils.compiling import quiet_expected_fallbacks


def test_only_the_expected_fallback_warning_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    quiet_expected_fallbacks()
    quiet_expected_fallbacks()  # installed once
    logger = logging.getLogger("torch._inductor.ir")
    assert sum(type(f).__name__ == "_ExpectedFallbacks" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch._inductor.ir"):
        logger.warning("aten.linalg_solve_triangular.default is missing a c-shim implementation, "
                       "using proxy executor as fallback")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
