"""What model a client's name means (§2.4): pure, over the catalogue and what the neurons
serve."""

from __future__ import annotations

from collections.abc import Callable

from helexa.cortex.catalogue import Catalogue


def resolve(catalogue: Catalogue, name: str, served: Callable[[str], bool]) -> str:
    """The concrete model id for ``name``: an alias's target; the name itself when the
    catalogue knows it or a neuron ``served`` it; else a matching fallback's target; else
    the name (which then gets its 404)."""
    model_id = catalogue.resolve(name)
    if model_id in catalogue.models or served(model_id):
        return model_id
    return catalogue.fallback_for(name) or model_id


def granting(catalogue: Catalogue, name: str, model_id: str) -> list[str]:
    """The names that led from ``name`` to ``model_id`` (for a key's allowlist): the name
    itself when it is the model or its alias, the fallback pattern that matched."""
    names = [name] if catalogue.resolve(name) == model_id else []
    match = catalogue.fallback_match(name)
    if match is not None and model_id != name and catalogue.resolve(match[1]) == model_id:
        names.append(match[0])
    return names
