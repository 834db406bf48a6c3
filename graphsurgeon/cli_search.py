"""`tune` and `policies`: compression search and the policy database."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_commands(sub: argparse._SubParsersAction, add_shape: Callable) -> None:  # type: ignore[type-arg]
    """Register this module's subcommands."""
