"""One-line, secret-free descriptions of errors from the stores, for CLI output and run logs."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """`Type: first line of the message`; connection strings are never part of these messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
