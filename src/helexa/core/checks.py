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


def config_to_check(
    tool: str, given: Path | None, default: Path, echo: Callable[..., None]
) -> Path:
    """The file ``<tool> check-config`` checks: the one given, else ``default``. A missing
    one is exit status 2 with the command to run instead (raised as SystemExit)."""
    path = given or default
    if not path.exists():
        echo(
            f"{tool} check-config: {path} does not exist; pass the path: "
            f"{tool} check-config path/to/{default.name}",
            err=True,
        )
        raise SystemExit(2)
    return path
