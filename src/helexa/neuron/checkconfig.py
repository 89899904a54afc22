"""``neuron check-config``: validate neuron.toml and say what the neuron would find.

Errors (a file that does not parse, a bad value, an unknown harness) fail the check.
Warnings do not: a harness whose library is missing, a ``model_dirs`` entry that does not
exist, a default model whose weights are not on this host (the neuron would download them
at start, or fail with ``HF_HUB_OFFLINE=1``). Weights are looked for exactly as a load looks
for them, offline: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helexa.core.checks import Report
from helexa.neuron.config import NeuronSettings

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def harness_cache(settings: NeuronSettings, harness: str) -> Path:
    """The weight cache a harness reads (as the registry builds it): its ``hf_cache``
    (llamacpp falls back to the transformers one), else HF_HUB_CACHE, HF_HOME/hub, default."""
    from helexa.neuron.model_files import hf_cache_dir

    if harness == "llamacpp":
        setting = settings.harness.llamacpp.hf_cache or settings.harness.transformers.hf_cache
    else:
        setting = settings.harness.transformers.hf_cache
    return hf_cache_dir(setting)


def find_weights(settings: NeuronSettings, model_id: str, quant: str | None, harness: str) -> str:
    """Where the weights of one model are on this host; ``LookupError`` saying why not."""
    from helexa.core.errors import ApiError
    from helexa.neuron.model_files import locate, locate_gguf

    cache = harness_cache(settings, harness)
    finder = locate_gguf if harness == "llamacpp" else locate
    try:
        files = finder(
            model_id, quant, cache_dir=cache, model_dirs=settings.model_dirs, env=OFFLINE
        )
    except ApiError as exc:
        raise LookupError(exc.message) from None
    if files.gguf_file:
        return str(files.root / files.gguf_file)
    if not any(files.root.glob("*.safetensors")):
        raise LookupError(f"{model_id}: no *.safetensors in {files.root}")
    return str(files.root)


def check(settings: NeuronSettings, echo: Callable[[str], None] = print) -> Report:
    from helexa.neuron import config
    from helexa.neuron.harness.registry import KNOWN, LIBRARY, available
    from helexa.neuron.model_files import harness_for_files

    report = Report()
    echo(f"  listen: {settings.host}:{settings.port}")
    unguarded = getattr(config, "unguarded_listen", None)  # the token rule, where it exists
    refusal = unguarded(settings) if unguarded else None
    if refusal:
        report.errors.append(f"the neuron would refuse to start: {refusal}")
    names = [h.name for h in settings.harnesses]
    explicit = "harnesses" in settings.model_fields_set
    usable = set()
    for name in names:
        if name not in KNOWN:
            report.errors.append(f"unknown harness {name!r} (known: {', '.join(KNOWN)})")
        elif not available(name):
            problem = f"the {name} harness needs the {LIBRARY[name]} package: " + (
                "pip install 'helexa[neuron]'"
            )
            (report.errors if explicit else report.warnings).append(
                problem + ("" if explicit else " (skipped at start)")
            )
        else:
            usable.add(name)
            echo(f"  harness {name}: weight cache {harness_cache(settings, name)}")
    for folder in settings.model_dirs:
        if not folder.expanduser().is_dir():
            report.warnings.append(f"model_dirs: {folder} does not exist")
        else:
            echo(f"  model_dirs: {folder}")
    _check_lending(settings, report, echo)
    if not settings.default_models:
        echo("  default_models: none (models load when cortex asks)")
    for spec in settings.default_models:
        label = f"default model {spec.model_id}" + (f" ({spec.quant})" if spec.quant else "")
        harness = harness_for_files(spec.model_id, spec.harness, settings.model_dirs)
        if harness not in usable:
            report.warnings.append(f"{label}: its harness {harness} is not available here")
            continue
        try:
            where = find_weights(settings, spec.model_id, spec.quant, harness)
        except LookupError as exc:
            report.warnings.append(
                f"{label}: not on this host yet; the neuron downloads it at start when it can "
                f"reach the Hugging Face hub (not with HF_HUB_OFFLINE=1). {exc}"
            )
            continue
        echo(f"  {label} on {harness}: {where}")
    return report


def _check_lending(settings: NeuronSettings, report: Report, echo: Callable[[str], None]) -> None:
    """Pooling: where this neuron's RPC servers would listen, or why it lends nothing."""
    from helexa.core.errors import ApiError
    from helexa.neuron.lending import lend_host

    if not settings.rpc.lend:
        echo("  lending: off ([rpc] lend = false)")
        return
    lo, hi = settings.rpc.ports
    try:
        host = lend_host(settings)
    except ApiError as exc:
        report.warnings.append(f"lending: off: {exc.message}")
        return
    echo(f"  lending: RPC servers on {host}:{lo}-{hi}, the borrower cortex names only")
