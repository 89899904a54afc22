"""``cortex models pull|ls|rm``: weights on the neurons, through a running cortex.

``pull`` starts the download on a neuron (the one named, else the one a cold load would
pick) and shows a progress bar until it is done; ``ls`` shows on which neurons each
model's weights are; ``rm`` deletes them from one neuron's cache."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

models_app = typer.Typer(no_args_is_help=True, help="Model weights on the neurons.")

Endpoint = Annotated[str, typer.Option(help="cortex base URL")]
Key = Annotated[
    str | None,
    typer.Option(envvar="CORTEX_API_KEY", help="the admin token (ls: or an API key)"),
]
POLL_S = 0.5


def _call(method: str, endpoint: str, path: str, key: str | None, body: Any = None) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(
            method, f"{endpoint.rstrip('/')}{path}", json=body, headers=headers, timeout=60
        )
    except httpx.HTTPError as exc:
        typer.echo(f"cortex models: cannot reach {endpoint}: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        typer.echo(f"cortex models: {response.status_code}: {message}", err=True)
        raise typer.Exit(1)
    return response.json()


def _download(
    endpoint: str, key: str | None, node: str, model_id: str, quant: str | None
) -> dict[str, Any] | None:
    fleet = _call("GET", endpoint, "/admin/dashboard", key)
    neuron = next((n for n in fleet["neurons"] if n["name"] == node), None)
    if neuron is None:
        return None
    downloads = neuron.get("downloads", [])
    return next((d for d in downloads if (d["model_id"], d["quant"]) == (model_id, quant)), None)


@models_app.command()
def pull(
    model: Annotated[str, typer.Argument(help="the model id")],
    node: Annotated[str | None, typer.Option(help="the neuron to download to")] = None,
    quant: Annotated[
        str | None,
        typer.Option(help="a GGUF repo's file to fetch, e.g. Q4_K_M (default: models.toml's)"),
    ] = None,
    endpoint: Endpoint = "http://127.0.0.1:31313",
    key: Key = None,
) -> None:
    """Download a model's weights to a neuron, with a progress bar."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    body = {"model_id": model, "node": node, "quant": quant}
    started = _call("POST", endpoint, "/admin/models/pull", key, body)
    where = started["node"]
    # As the neuron names it: its canonical id, and the catalogue's quant when none was given.
    model, quant = started["download"]["model_id"], started["download"]["quant"]
    if started["download"]["state"] == "done":
        typer.echo(f"{model}: already on {where}")
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("{task.description}", *columns) as progress:
        task = progress.add_task(f"{model} → {where}", total=None)
        while True:
            state = _download(endpoint, key, where, model, quant) or started["download"]
            progress.update(task, completed=state["done_bytes"], total=state["total_bytes"])
            if state["state"] != "downloading":
                break
            time.sleep(POLL_S)
    if state["state"] == "failed":
        typer.echo(f"cortex models pull: {model} on {where}: {state['error']}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{model}: on {where}")


@models_app.command("ls")
def list_models(endpoint: Endpoint = "http://127.0.0.1:31313", key: Key = None) -> None:
    """Where each model's weights are (each neuron's cache and model_dirs)."""
    from rich.console import Console
    from rich.table import Table

    stored = _call("GET", endpoint, "/admin/models/stored", key)
    where: dict[str, list[str]] = {}
    size: dict[str, int] = {}
    for node, models in stored.items():
        if isinstance(models, dict):  # that neuron could not say
            typer.echo(f"{node}: {models.get('error')}", err=True)
            continue
        for entry in models:
            where.setdefault(entry["model_id"], []).append(f"{node} ({entry['where']})")
            size[entry["model_id"]] = entry["bytes"]
    table = Table(title="model weights")
    for column in ("model", "size", "on"):
        table.add_column(column)
    for model_id in sorted(where):
        table.add_row(model_id, f"{size[model_id] / 1e6:,.0f} MB", ", ".join(where[model_id]))
    Console().print(table)


@models_app.command()
def rm(
    model: Annotated[str, typer.Argument(help="the model id")],
    node: Annotated[str, typer.Option(help="the neuron to delete its weights from")],
    endpoint: Endpoint = "http://127.0.0.1:31313",
    key: Key = None,
) -> None:
    """Delete a model's weights from one neuron's cache (not while it is loaded)."""
    done = _call("POST", endpoint, "/admin/models/delete", key, {"model_id": model, "node": node})
    typer.echo(f"{model}: deleted on {node} ({done['freed_bytes'] / 1e6:,.0f} MB)")
