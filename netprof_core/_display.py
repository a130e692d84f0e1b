"""Text from outside (route and app names, methods, a daemon's messages) made
safe to show: on a terminal, in a log line, in a notification's text.

A route name is whatever an app's route templates or a client hook's name
hold, and anything at ``--url`` answers what it likes: such text must never
move the cursor, clear the screen, set a window title, reorder what follows it
(bidi overrides) or start a new line. rich alone does not do it: its ``Text``
drops BEL, BS, VT, FF and CR but keeps ESC, and a plain ``str`` cell is parsed
as markup (``[/x]`` raises, ``[link=...]`` makes a link).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

__all__ = ("PrintableFormatter", "format_duration", "printable", "shorten")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character that is not printable shown as its
    Python escape (``\\x1b``, ``\\u202e``, ``\\n``): C0 and C1 controls, DEL,
    format characters such as bidi overrides and zero-width joiners, line and
    paragraph separators, surrogates, unassigned and private-use code points
    (``str.isprintable``'s definition; the space stays). Printable text is
    returned as it is, and the result is printable, so applying it twice
    changes nothing. Never raises on a str."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters and "...": what a client or a file
    sent is quoted in a message, never echoed back whole."""
    return text if len(text) <= limit else text[:limit] + "..."


def format_duration(ns: float) -> str:
    """A duration in ns, in the unit that keeps it short, rounded by at most
    0.5 % from 1 µs up (three significant digits or more): ``512ns``,
    ``1.05µs``, ``10.8ms``, ``2.50s``; ``-`` for NaN."""
    if math.isnan(ns):
        return "-"
    if ns < 1e3:
        return f"{ns:.0f}ns"  # the clock's resolution
    for unit, scale in (("µs", 1e3), ("ms", 1e6)):
        if ns < 1e3 * scale:
            return _three_digits(ns / scale, unit)
    return _three_digits(ns / 1e9, "s")


def _three_digits(value: float, unit: str) -> str:
    return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"


class PrintableFormatter(logging.Formatter):
    """A log formatter that passes a record's arguments (paths, names, error
    messages: the data of a line, not its text) through :func:`printable`, so
    that no name reaches a terminal or journal as control and none starts a
    line of its own (a line break in an argument is followed by an indent, as
    in a traceback). The format string's own text, and a traceback, are kept."""

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if args:
            record = copy.copy(record)
            record.args = _printable_args(args)
        return super().format(record)


class _Shown:
    """A log argument that is not a str or a number, shown printable by ``%s`` and ``%r``."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return _continued(str(self.value))

    def __repr__(self) -> str:
        return printable(repr(self.value))


def _printable_arg(value: object) -> Any:
    if isinstance(value, str):
        return _continued(value)
    if isinstance(value, (int, float)):
        return value  # for %d and %f; a number prints no control
    return _Shown(value)


def _continued(text: str) -> str:
    """printable(), except that a line break stays one, with the next line
    indented as a traceback's are: a many-line message (a config's problems)
    stays readable, and no argument can start a line that looks like a record."""
    return "\n    ".join(printable(line) for line in text.split("\n"))


def _printable_args(args: tuple[object, ...] | Mapping[str, object]) -> Any:
    if isinstance(args, Mapping):
        return {key: _printable_arg(value) for key, value in args.items()}
    return tuple(_printable_arg(value) for value in args)
