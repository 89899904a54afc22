"""``cortex keys add NAME [--models a,b] | list | revoke NAME`` — the keys file that
cortex.toml's ``[auth] keys_file`` names (a running cortex picks up changes by itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from helexa.core.settings import ConfigError

keys_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="API keys for cortex: stored hashed; each key is shown once, when added.",
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="cortex.toml (default /etc/cortex/cortex.toml)"),
]


def _keys_file(config: Path | None) -> Path:
    from helexa.core.settings import load_settings
    from helexa.cortex.cli_config import config_file
    from helexa.cortex.config import CortexSettings
    from helexa.cortex.keys import keys_path

    path = config_file(config)
    try:
        settings = load_settings(CortexSettings, path)
    except ConfigError as exc:
        typer.echo(f"cortex keys: bad configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    keys = keys_path(settings.auth.keys_file, path)
    if keys is None:
        typer.echo(
            f"cortex keys: {path or 'the configuration'} names no keys file; add\n"
            '  [auth]\n  keys_file = "keys.toml"    # next to cortex.toml\n'
            "to cortex.toml (or set CORTEX_AUTH__KEYS_FILE), or pass --config",
            err=True,
        )
        raise typer.Exit(2)
    return keys


def _fail(message: str, status: int = 1) -> typer.Exit:
    typer.echo(f"cortex keys: {message}", err=True)
    return typer.Exit(status)


@keys_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="who the key is for (shown in logs and metrics)")],
    models: Annotated[
        str | None,
        typer.Option(help="comma-separated models (names or aliases) it may use; default: all"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Add a key and print it (once: only its hash is kept)."""
    from helexa.cortex.keys import add_key

    path = _keys_file(config)
    allowed = None if models is None else models.split(",")
    try:
        secret = add_key(path, name, allowed)
    except (ValueError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc}") from None
    scope = f"models: {', '.join(a.strip() for a in allowed or [])}" if allowed else "all models"
    typer.echo(f"added key {name!r} ({scope}) to {path}; it is shown only now:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def list_keys(config: ConfigOption = None) -> None:
    """Names, creation times and model allowlists (never the keys or their hashes)."""
    from helexa.cortex.keys import read_keys

    path = _keys_file(config)
    try:
        keys = read_keys(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if not keys:
        typer.echo(f"no keys in {path}", err=True)
        return
    width = max(len(k.name) for k in keys)
    for key in keys:
        models = ", ".join(sorted(key.models)) if key.models is not None else "(all models)"
        typer.echo(f"{key.name:<{width}}  {key.created or '-':<20}  {models}")


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="the key's name")],
    config: ConfigOption = None,
) -> None:
    """Remove a key: a running cortex refuses it within a second."""
    from helexa.cortex.keys import revoke_key

    path = _keys_file(config)
    try:
        removed = revoke_key(path, name)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc}") from None
    if not removed:
        raise _fail(f"no key named {name!r} in {path}")
    typer.echo(f"revoked key {name!r}", err=True)
