"""Option types the tools' commands share: argparse reports their errors as usage errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from proxy.config import parse_address

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_Number = TypeVar("_Number", int, float)


def positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """An option type: a number of `kind` above zero."""

    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def address(text: str) -> tuple[str, int]:
    """An option type: `host:port`, as the config file takes it."""
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
