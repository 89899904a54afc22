"""``neuron [--config PATH] [--host H] [--port N]``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from helexa.core.logs import setup_logging
from helexa.core.settings import ConfigError, load_settings
from helexa.neuron.config import NeuronSettings

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
    setup_logging(settings.log_level)
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
    from helexa.neuron.service import Neuron

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
            drain_timeout_s=settings.drain_timeout_s,
        ),
        on_drain=neuron.begin_drain,
        on_bound=neuron.start_prewarm,
    )
    server.run()
    if not server.started:
        sys.exit(1)
    log.info("stopped")


def main() -> None:
    typer.run(serve)


if __name__ == "__main__":
    main()
