"""models.toml: the catalogue of how to serve each model (not where), plus aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from helexa.core.settings import ConfigError, describe_validation_error, read_toml
from helexa.core.wire import default_harness


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    harness: str = ""  # empty: from the weights' format (GGUF: llamacpp, else transformers)
    quant: str | None = None
    vram_mb: int | None = Field(default=None, ge=0)
    min_devices: int = Field(default=1, ge=0)  # 0: may run on a CPU budget
    min_device_vram_mb: int = Field(default=0, ge=0)
    pinned_on: tuple[str, ...] = ()
    priority: int = 0

    @model_validator(mode="before")
    @classmethod
    def _pick_harness(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("harness") and data.get("id"):
            data = {**data, "harness": default_harness(str(data["id"]), data.get("quant"))}
        return data

    @property
    def cpu_ok(self) -> bool:
        return self.min_devices == 0


@dataclass(frozen=True)
class Catalogue:
    models: dict[str, ModelProfile] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # Glob patterns for names clients pick themselves (Claude Code asks for claude-*),
    # in file order: the first match wins. Only names the catalogue does not know use them.
    fallbacks: tuple[tuple[str, str], ...] = ()

    def resolve(self, name: str) -> str:
        """The concrete id behind an alias (or the name itself)."""
        return self.aliases.get(name, name)

    def fallback_match(self, name: str) -> tuple[str, str] | None:
        """The first fallback ``(pattern, target)`` that matches ``name``."""
        return next(((p, t) for p, t in self.fallbacks if fnmatchcase(name, p)), None)

    def fallback_for(self, name: str) -> str | None:
        """The model a fallback pattern maps ``name`` to, if any pattern matches."""
        match = self.fallback_match(name)
        return match[1] if match else None

    def profile(self, model_id: str) -> ModelProfile | None:
        return self.models.get(model_id)


def parse_catalogue(data: dict[str, Any], source: str) -> Catalogue:
    """Validate a parsed models.toml; every problem is reported by entry name."""
    problems: list[str] = []
    unknown = set(data) - {"models", "aliases", "fallbacks"}
    if unknown:
        problems.append(f"{source}: unknown top-level keys {sorted(unknown)}")
    entries = data.get("models", [])
    if not isinstance(entries, list):
        problems.append(f"{source}: 'models' must be an array of tables ([[models]])")
        entries = []
    models: dict[str, ModelProfile] = {}
    for index, entry in enumerate(entries):
        name = entry.get("id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        label = f"{source}: models[{index}] ({name})"
        try:
            profile = ModelProfile.model_validate(entry)
        except ValidationError as exc:
            problems.append(describe_validation_error(exc, label))
            continue
        if profile.id in models:
            problems.append(f"{label}: duplicate id {profile.id!r}")
            continue
        models[profile.id] = profile
    aliases_raw = data.get("aliases", {})
    aliases: dict[str, str] = {}
    if not isinstance(aliases_raw, dict):
        problems.append(f'{source}: [aliases] must be a table of name = "model id"')
        aliases_raw = {}
    for alias, target in aliases_raw.items():
        if not isinstance(target, str):
            problems.append(f"{source}: alias {alias!r} must map to a model id string")
        elif target not in models:
            problems.append(
                f"{source}: alias {alias!r} points to {target!r}, which is not in the catalogue"
            )
        elif alias in models:
            problems.append(f"{source}: alias {alias!r} shadows a catalogue model id")
        else:
            aliases[alias] = target
    fallbacks_raw = data.get("fallbacks", {})
    fallbacks: list[tuple[str, str]] = []
    if not isinstance(fallbacks_raw, dict):
        problems.append(f'{source}: [fallbacks] must be a table of "pattern" = "model id"')
        fallbacks_raw = {}
    for pattern, target in fallbacks_raw.items():
        resolved = aliases.get(target, target) if isinstance(target, str) else None
        if resolved is None:
            problems.append(f"{source}: fallback {pattern!r} must map to a model id string")
        elif resolved not in models:
            problems.append(
                f"{source}: fallback {pattern!r} points to {target!r}, which is not in the "
                "catalogue"
            )
        else:
            fallbacks.append((pattern, resolved))
    if problems:
        raise ConfigError("\n".join(problems))
    return Catalogue(models=models, aliases=aliases, fallbacks=tuple(fallbacks))


def load_catalogue(path: Path) -> Catalogue:
    if not path.exists():
        raise ConfigError(f"{path}: models config not found")
    return parse_catalogue(read_toml(path), str(path))
