"""Argument types that refuse nonsense at parse time: `--workers 0`, `--port 99999`, `--top-p 0`.

Each returns a function for argparse's `type=`; a bad value becomes argparse's own error, which the
CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, low: float | None, high: float | None, low_open: bool = False,
            what: str = "") -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


positive_int = _number(int, 1, None, what="must be at least 1")
non_negative_int = _number(int, 0, None, what="must be 0 or more")
port = _number(int, 0, 65535, what="a TCP port is 0..65535 (0 picks a free one)")
positive_float = _number(float, 0, None, low_open=True, what="must be more than 0")
non_negative_float = _number(float, 0, None, what="must be 0 or more")
temperature = _number(float, 0, 2, what="temperature is 0..2 (0 is greedy)")
top_p = _number(float, 0, 1, low_open=True, what="top-p is in (0, 1]")
fraction = _number(float, 0, 1, low_open=True, what="must be in (0, 1]")


class DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default worth saying and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`edge-llm: error: ...`) and exit status 2, and
    --help shows every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
