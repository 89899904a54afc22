"""``neuron [--config PATH] [--host H] [--port N]``, ``neuron check-config [PATH]``."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from helexa.core.logs import setup_logging
from helexa.core.settings import ConfigError, load_settings
from helexa.neuron.config import NeuronSettings, unguarded_listen

log = logging.getLogger("helexa.neuron")


def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="neuron.toml (default: /etc/neuron/neuron.toml "
            "if present, else built-in defaults)",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 13131)")] = None,
) -> None:
    """Run the neuron: hardware discovery, model lifecycle and inference for this host."""
    # NVML and CUDA must agree on device numbering.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if config is not None and not config.exists():
        typer.echo(f"neuron: config file {config} does not exist", err=True)
        raise typer.Exit(2)
    path = config
    if path is None:
        from helexa.neuron.config import DEFAULT_CONFIG_PATH

        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    try:
        settings = load_settings(NeuronSettings, path, {"host": host, "port": port})
    except ConfigError as exc:
        typer.echo(f"neuron: bad configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    unguarded = unguarded_listen(settings)
    if unguarded is not None:
        typer.echo(f"neuron: refusing to start: {unguarded}", err=True)
        raise typer.Exit(2)
    setup_logging(settings.log_level)
    # A native crash (SIGSEGV, SIGILL, SIGABRT from an engine) leaves every thread's Python
    # stack in the log (stderr: the journal under systemd) instead of nothing at all.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if settings.admin_token:
        log.warning("admin_token is deprecated: it is now called token (and guards every route)")
    from helexa.core.limits import raise_nofile

    raise_nofile()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per event in the journal, no bars
    log.info(
        "starting",
        extra={
            "config": str(path) if path else "defaults",
            "host": settings.host,
            "port": settings.port,
        },
    )

    from helexa.core.serving import DrainingServer, uvicorn_config
    from helexa.neuron.app import build_app
    from helexa.neuron.service import DRAIN_GRACE_S, Neuron

    try:
        neuron = Neuron(settings)
    except ValueError as exc:
        typer.echo(f"neuron: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    server = DrainingServer(
        uvicorn_config(
            build_app(neuron),
            settings.host,
            settings.port,
            # The drain itself (neuron.drained) runs before uvicorn's shutdown, with the
            # listener open; uvicorn then only waits for the connections left.
            drain_timeout_s=DRAIN_GRACE_S,
            limits=settings.limits,
        ),
        on_drain=neuron.begin_drain,
        on_bound=neuron.start_prewarm,
        drain=neuron.drained,
    )
    server.run()
    if not server.started:
        sys.exit(1)
    log.info("stopped")


def check_config(
    path: Annotated[
        Path | None,
        typer.Argument(help="neuron.toml to validate (default /etc/neuron/neuron.toml)"),
    ] = None,
) -> None:
    """Validate neuron.toml; say which harnesses, model_dirs and default-model weights the
    neuron would find (offline: nothing is downloaded). Warnings do not fail the check."""
    from helexa.core.checks import conclude, config_to_check
    from helexa.neuron.checkconfig import check
    from helexa.neuron.config import DEFAULT_CONFIG_PATH

    path = config_to_check("neuron", path, DEFAULT_CONFIG_PATH, typer.echo)
    typer.echo(f"checking {path}")
    try:
        settings = load_settings(NeuronSettings, path)
    except ConfigError as exc:
        typer.echo(f"invalid:\n{exc}", err=True)
        raise typer.Exit(1) from None
    report = check(settings, echo=typer.echo)
    raise typer.Exit(conclude(report, path, typer.echo))


def _command(function: Callable[..., None], epilog: str | None = None) -> Any:
    single = typer.Typer(add_completion=False)
    single.command(epilog=epilog)(function)
    return typer.main.get_command(single)


def main(argv: list[str] | None = None) -> None:
    """``neuron [OPTIONS]`` serves (as it always has: the unit and the tests start it so);
    ``neuron check-config [PATH]`` validates a config file; ``neuron --version``."""
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:  # eager, like cortex --version: before anything is parsed
        from helexa import __version__

        typer.echo(f"neuron {__version__}")
        return
    if args and args[0] == "check-config":
        _command(check_config).main(args=args[1:], prog_name="neuron check-config")
        return
    _command(
        serve,
        epilog="Also: neuron check-config [PATH] validates neuron.toml; neuron --version.",
    ).main(args=args, prog_name="neuron")


if __name__ == "__main__":
    main()
