"""The one exception type of configuration problems."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration value: names the key, the value, what is accepted and the file."""

    def __init__(self, key: str, value: Any, expected: str, source: str | None = None,
                 hint: str = "") -> None:
        self.key, self.value, self.expected, self.source, self.hint = key, value, expected, source, hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" (in {self.source})" if self.source else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"config key '{self.key}'{where}: got {self.value!r}, expected {self.expected}{hint}"

    def with_source(self, source: str) -> ConfigError:
        """The same error, naming the file or override it came from."""
        if self.source is None:
            self.source = source
            self.args = (self._render(),)
        return self
