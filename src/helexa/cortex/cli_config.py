"""Which cortex.toml a command reads: the one named (it must exist), else the default path
when it exists, else none (built-in defaults). Shared by ``cortex`` and ``cortex keys``."""

from __future__ import annotations

from pathlib import Path

import typer


def config_file(config: Path | None) -> Path | None:
    from helexa.cortex.config import DEFAULT_CONFIG_PATH

    if config is not None:
        if not config.exists():
            typer.echo(f"cortex: config file {config} does not exist", err=True)
            raise typer.Exit(2)
        return config
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
