"""What a ``check-config`` command found, and how it ends: shared by cortex and neuron."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what was checked, and the summary

    @property
    def ok(self) -> bool:
        return not self.errors


def conclude(report: Report, path: Path, echo: Callable[..., None]) -> int:
    """Print the warnings, then the errors (on stderr) or ``ok``; the exit status."""
    for warning in report.warnings:
        echo(f"warning: {warning}")
    if not report.ok:
        echo("invalid:\n" + "\n".join(report.errors), err=True)
        return 1
    echo(f"ok{f' ({len(report.warnings)} warnings)' if report.warnings else ''}: {path}")
    return 0
