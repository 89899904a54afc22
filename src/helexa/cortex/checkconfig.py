"""``cortex check-config``: validate cortex.toml and its models.toml, then warn about models
no neuron could ever host.

Errors (a file that does not parse, a bad entry) fail the check. Warnings do not: a
catalogue entry no configured neuron could host, a neuron that cannot be reached, a
CPU-only fleet whose models still ask for a GPU (``min_devices`` defaults to 1). The
hardware comes from each neuron's ``GET /discovery`` and ``GET /health``, as cortex's poller
sees it, and is judged with the placement module's own ``feasible``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from helexa.core.checks import Report
from helexa.core.wire import Discovery, Health
from helexa.cortex.catalogue import Catalogue, ModelProfile
from helexa.cortex.config import CortexSettings, NeuronEntry
from helexa.cortex.placement import CPU_POOL, Device, NeuronView, feasible, pools_for

# The harness names a neuron runs (helexa.neuron.harness.registry.KNOWN; not imported here:
# a gateway host need not have the neuron's libraries).
KNOWN_HARNESSES = ("transformers", "llamacpp")


def models_path(settings: CortexSettings, config_path: Path | None) -> Path:
    """Where load_config reads the catalogue: relative paths resolve next to cortex.toml."""
    path = settings.models_config
    if not path.is_absolute():
        path = (config_path.parent if config_path else Path.cwd()) / path
    return path


def neuron_token(settings: CortexSettings, entry: NeuronEntry | None = None) -> str | None:
    """The token cortex sends to a neuron: the entry's own ``token``, else ``neuron_token``,
    else ``admin_token`` (older configs), whichever of these the settings have."""
    return (
        getattr(entry, "token", None)
        or getattr(settings, "neuron_token", None)
        or getattr(settings, "admin_token", None)
    )


@dataclass(frozen=True)
class Probe:
    """What one neuron said (or why it said nothing)."""

    name: str
    endpoint: str
    discovery: Discovery | None = None
    health: Health | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.discovery is not None


def probe(entry: NeuronEntry, token: str | None, timeout: float = 3.0) -> Probe:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=entry.endpoint, timeout=timeout, headers=headers) as client:
            answers = {}
            for route in ("discovery", "health"):
                response = client.get(f"/{route}")
                if response.status_code in (401, 403):
                    return Probe(
                        entry.name,
                        entry.endpoint,
                        error=f"GET /{route} answered {response.status_code}: the neuron wants "
                        "a token and cortex's does not match",
                    )
                if response.status_code == 421:
                    host = urlsplit(entry.endpoint).hostname
                    return Probe(
                        entry.name,
                        entry.endpoint,
                        error=f"GET /{route} answered 421: the neuron does not answer to the "
                        f"name {host!r}; add it to [http] allowed_hosts in its neuron.toml",
                    )
                response.raise_for_status()
                answers[route] = response.json()
        return Probe(
            entry.name,
            entry.endpoint,
            discovery=Discovery.model_validate(answers["discovery"]),
            health=Health.model_validate(answers["health"]),
        )
    except httpx.HTTPStatusError as exc:
        return Probe(entry.name, entry.endpoint, error=f"answered {exc.response.status_code}")
    except httpx.HTTPError as exc:
        return Probe(entry.name, entry.endpoint, error=f"{type(exc).__name__}: {exc}")
    except (ValueError, ValidationError) as exc:  # not JSON, or not a neuron's answer
        return Probe(entry.name, entry.endpoint, error=f"not a neuron's answer: {exc}")


def probe_all(settings: CortexSettings, timeout: float = 3.0) -> list[Probe]:
    """Every configured neuron, concurrently."""
    entries = settings.neurons
    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(len(entries), 16)) as pool:
        return list(pool.map(lambda e: probe(e, neuron_token(settings, e), timeout), entries))


def view_of_probe(found: Probe) -> NeuronView:
    """The placement picture of a probed neuron (nothing loaded counts: free is as reported)."""
    assert found.discovery is not None
    free = {d.index: d.vram_free_mb for d in (found.health.devices if found.health else [])}
    devices = tuple(
        Device(index=d.index, total_mb=d.vram_total_mb, free_mb=free.get(d.index, 0))
        for d in found.discovery.devices
    )
    cpu_free = found.health.cpu.memory_free_mb if found.health else 0
    return NeuronView(name=found.name, healthy=True, devices=devices, cpu_free_mb=cpu_free)


def describe_hardware(found: Probe) -> str:
    assert found.discovery is not None
    gpus = found.discovery.devices
    gpu_text = (
        f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ("
        + ", ".join(f"{d.name} {d.vram_total_mb} MB" for d in gpus)
        + ")"
        if gpus
        else "0 GPUs"
    )
    return (
        f"{gpu_text}, CPU budget {found.discovery.cpu.memory_total_mb} MB, harnesses "
        f"{', '.join(found.discovery.harnesses) or 'none'}"
    )


def _device_total(view: NeuronView, index: int) -> int:
    return next((d.total_mb for d in view.devices if d.index == index), 0)


def _needs(profile: ModelProfile) -> str:
    if profile.cpu_ok:
        return "a CPU budget or a GPU"
    count = max(profile.min_devices, 1)
    text = f"{count} GPU{'s' if count > 1 else ''}"
    if profile.min_device_vram_mb:
        text += f" of at least {profile.min_device_vram_mb} MB"
    return text


def _has(view: NeuronView, profile: ModelProfile) -> str:
    eligible = [d for d in view.devices if d.total_mb >= profile.min_device_vram_mb]
    text = f"{view.name} has {len(view.devices)} GPU{'s' if len(view.devices) != 1 else ''}"
    if profile.min_device_vram_mb and len(eligible) != len(view.devices):
        text += f" ({len(eligible)} large enough)"
    return text


def static_warnings(settings: CortexSettings, catalogue: Catalogue) -> list[str]:
    """What is wrong whatever hardware the neurons have."""
    warnings = []
    if not settings.neurons:
        warnings.append(
            "no [[neurons]] configured: cortex has nowhere to run a model (add one "
            '[[neurons]] entry per host: name = "…", endpoint = "http://host:13131")'
        )
    for profile in catalogue.models.values():
        if profile.harness not in KNOWN_HARNESSES:
            warnings.append(
                f"model {profile.id}: harness {profile.harness!r} is not one a neuron runs "
                f"({', '.join(KNOWN_HARNESSES)}): no neuron can host it"
            )
    return warnings


def hardware_warnings(catalogue: Catalogue, probes: Sequence[Probe]) -> list[str]:
    """Models the reachable neurons could never host, judged as placement judges them."""
    reachable = [p for p in probes if p.reachable]
    if not reachable:
        return []
    views = {p.name: view_of_probe(p) for p in reachable}
    harnesses = {p.name: set(p.discovery.harnesses) for p in reachable if p.discovery}
    cpu_total = {p.name: p.discovery.cpu.memory_total_mb for p in reachable if p.discovery}
    cpu_only = all(not v.devices for v in views.values())
    partial = len(reachable) < len(probes)
    scope = "reachable neuron" if partial else "neuron"
    warnings = []
    for profile in catalogue.models.values():
        if profile.harness not in KNOWN_HARNESSES:
            continue  # said already
        hosts = [v for v in views.values() if feasible(profile, v)]
        if not hosts:
            why = "; ".join(_has(v, profile) for v in views.values())
            if profile.pinned_on:
                why += f"; pinned_on {', '.join(profile.pinned_on)}"
            text = f"model {profile.id}: no {scope} can host it (needs {_needs(profile)}; {why})"
            if cpu_only and not profile.cpu_ok:
                text += (
                    f". Every {scope} is CPU-only and min_devices is {profile.min_devices}"
                    + (" (the default)" if "min_devices" not in profile.model_fields_set else "")
                    + ": set `min_devices = 0` in its [[models]] entry to run it on a "
                    "neuron's CPU memory budget"
                )
            warnings.append(text)
            continue
        running = [v for v in hosts if profile.harness in harnesses[v.name]]
        if not running:
            warnings.append(
                f"model {profile.id}: needs the {profile.harness} harness, which no feasible "
                f"{scope} runs ("
                + "; ".join(
                    f"{v.name}: {', '.join(sorted(harnesses[v.name])) or 'none'}" for v in hosts
                )
                + "); install helexa[neuron] there"
            )
            continue
        if profile.vram_mb is not None:
            room = max(
                (
                    cpu_total[v.name] if pool == CPU_POOL else _device_total(v, pool)
                    for v in running
                    for pool in pools_for(profile, v)
                ),
                default=0,
            )
            if room < profile.vram_mb:
                warnings.append(
                    f"model {profile.id}: vram_mb = {profile.vram_mb} is more than any "
                    f"{scope} that could host it has (at most {room} MB in one place): it "
                    "will never fit"
                )
    return warnings


def check(
    path: Path,
    *,
    contact_neurons: bool = True,
    timeout: float = 3.0,
    echo: Callable[[str], None] = print,
) -> Report:
    """Validate ``path`` and its catalogue; ``echo`` each line as it is known."""
    from helexa.core.settings import ConfigError, load_settings
    from helexa.cortex.config import load_config

    report = Report()

    def say(line: str) -> None:
        report.lines.append(line)
        echo(line)

    say(f"checking {path}")
    try:
        settings = load_settings(CortexSettings, path)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    say(f"  models: {models_path(settings, path)}")
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    catalogue = loaded.catalogue
    say(
        f"  {len(settings.neurons)} neurons, {len(catalogue.models)} models, "
        f"{len(catalogue.aliases)} aliases, {len(catalogue.fallbacks)} fallbacks"
    )
    report.warnings += static_warnings(settings, catalogue)
    if contact_neurons and settings.neurons:
        probes = probe_all(settings, timeout)
        for found in probes:
            if found.reachable:
                say(f"  neuron {found.name} ({found.endpoint}): {describe_hardware(found)}")
            else:
                report.warnings.append(
                    f"neuron {found.name} ({found.endpoint}) is unreachable: {found.error}; "
                    "its hardware is not checked"
                )
        report.warnings += hardware_warnings(catalogue, probes)
    elif settings.neurons:
        say("  neurons not contacted (--offline): hardware not checked")
    return report
