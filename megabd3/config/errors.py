"""Config problems and the one exception that carries all of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from megabd3.errors import UserError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config.

    ``keys`` are the dotted key paths involved (used to name the file each came from); ``message``
    is one line that names the keys, what was expected, what was found and how to fix it.
    ``source`` is set when the problem is tied to one file (unknown key, bad JSON) rather than to
    keys whose origin is looked up afterwards.
    """

    keys: tuple[str, ...]
    message: str
    source: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


class ConfigError(UserError):
    """Every problem found in a config, reported together.

    ``problems`` holds one line per problem; ``str()`` is the full multi-line message.
    """

    def __init__(self, problems: Iterable[str], what: str = "config") -> None:
        self.problems: list[str] = list(problems)
        self.what = what
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        if n == 1:  # one problem: one line
            return f"problem in {self.what}: {self.problems[0]}"
        head = f"{n} problem{'s' if n != 1 else ''} in {self.what}:"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])

    def __str__(self) -> str:
        return self._render()


def raise_if(problems: Sequence[object], what: str = "config") -> None:
    """Raise a :class:`ConfigError` listing ``problems`` (anything with a ``str``) if there are any."""
    if problems:
        raise ConfigError([str(p) for p in problems], what)
