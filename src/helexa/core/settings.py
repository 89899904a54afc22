"""TOML config files with environment overrides, shared by both daemons.

Precedence, highest first: explicit values (CLI flags), environment
(``PREFIX_KEY``, ``__`` between nesting levels), the TOML file, defaults.
A file that exists but does not parse, or holds a bad value, is a
``ConfigError`` naming the line or the key — never a silent fallback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message says where."""


def require_unique(names: list[str], what: str) -> None:
    """ValueError naming the repeated ones, for a validator of a list of named entries."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {dupes}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


class _DictSource(PydanticBaseSettingsSource):
    """Feeds an already-parsed TOML document to pydantic-settings."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    cls: type[SettingsT],
    path: Path | None,
    overrides: dict[str, Any] | None = None,
) -> SettingsT:
    """Build ``cls`` from ``path`` (None or missing: defaults), env and ``overrides``."""
    data: dict[str, Any] = read_toml(path) if path is not None and path.exists() else {}

    class _Loaded(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls_inner,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, data))

    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        loaded = _Loaded(**clean)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path or "config"))) from exc
    return loaded
