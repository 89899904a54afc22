"""cortex's API keys file: names, hashes, creation times and model allowlists — never a
key itself. ``cortex keys add|list|revoke`` edit it; a running cortex re-reads it when it
changes (``KeyStore``).

```toml
[[keys]]
name = "alice"
sha256 = "9f86d08…"                 # of the key, hex
created = "2025-01-31T12:00:00Z"
models = ["Qwen/Qwen3-8B"]          # optional: only these (names or resolved ids)
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from helexa.core.auth import ApiKey, KeyRing, hash_key, new_key
from helexa.core.settings import (
    ConfigError,
    describe_validation_error,
    read_toml,
    require_unique,
)

log = logging.getLogger("helexa.cortex.auth")

# Key names go on log lines and metric labels: short and plain. Names cortex gives the
# admin token and the literal env key start with ":" and cannot collide with these.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ENV_KEY_NAME = ":env"
RECHECK_S = 1.0  # how often a running cortex looks at the file's mtime

HEADER = (
    "# cortex API keys: only each key's SHA-256 is kept. Edit with\n"
    "#   cortex keys add NAME [--models a,b] | cortex keys list | cortex keys revoke NAME\n"
    "# A running cortex picks up changes within a second.\n"
)


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str = ""
    models: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(f"{value!r}: a key name is letters, digits, '.', '_', '@', '-'")
        return value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _unique(cls, value: list[KeyEntry]) -> list[KeyEntry]:
        require_unique([k.name for k in value], "key")
        return value


def keys_path(keys_file: Path | None, config_path: Path | None) -> Path | None:
    """The keys file a config names, relative paths resolved next to the config file."""
    if keys_file is None:
        return None
    if keys_file.is_absolute():
        return keys_file
    return (config_path.parent if config_path else Path.cwd()) / keys_file


def read_keys(path: Path) -> list[ApiKey]:
    """The keys in ``path`` (none when it does not exist); ConfigError when unusable."""
    if not path.exists():
        return []
    try:
        parsed = KeysFile.model_validate(read_toml(path))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path))) from None
    return [
        ApiKey(
            name=k.name,
            sha256=k.sha256,
            created=k.created,
            models=None if k.models is None else frozenset(k.models),
        )
        for k in parsed.keys
    ]


def _toml_string(value: str) -> str:
    # JSON's escapes are TOML's (names and model ids carry no control characters).
    return json.dumps(value, ensure_ascii=False)


def render_keys(keys: Iterable[ApiKey]) -> str:
    out = [HEADER]
    for key in keys:
        out.append(
            f"\n[[keys]]\nname = {_toml_string(key.name)}\nsha256 = {_toml_string(key.sha256)}\n"
            f"created = {_toml_string(key.created)}\n"
        )
        if key.models is not None:
            out.append(f"models = [{', '.join(_toml_string(m) for m in sorted(key.models))}]\n")
    return "".join(out)


def write_keys(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace the file atomically (a running cortex never reads half of it), keeping the
    old file's mode and owner where it can."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(render_keys(keys))
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            old = path.stat()
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
            with contextlib.suppress(OSError):
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_model_names(models: Iterable[str]) -> list[str]:
    names = [m.strip() for m in models if m.strip()]
    for name in names:
        if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in name):
            raise ValueError(f"{name!r} is not a model name")
    return names


@contextlib.contextmanager
def editing(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the keys file between `cortex keys` runs: two at once
    must not lose a key whose secret was already printed, nor bring a revoked one back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_key(path: Path, name: str, models: list[str] | None) -> str:
    """Add a key named ``name`` and return it: the only time it is ever seen."""
    if not NAME.fullmatch(name):
        raise ValueError(
            f"{name!r}: a key name is 1-64 letters, digits, '.', '_', '@' or '-' "
            "(it goes on log lines and metric labels)"
        )
    allowed = None if models is None else frozenset(check_model_names(models))
    with editing(path):
        keys = read_keys(path)
        if any(k.name == name for k in keys):
            raise ValueError(f"a key named {name!r} exists; revoke it first or choose another name")
        secret = new_key()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        keys.append(ApiKey(name=name, sha256=hash_key(secret), created=created, models=allowed))
        write_keys(path, keys)
    return secret


def revoke_key(path: Path, name: str) -> bool:
    with editing(path):
        keys = read_keys(path)
        kept = [k for k in keys if k.name != name]
        if len(kept) == len(keys):
            return False
        write_keys(path, kept)
    return True


class KeyStore:
    """The keys a running cortex accepts: the file's (re-read when it changes, looked at no
    more than once a second) plus a literal key from the settings. ``ring()`` is None when
    no keys are configured at all: the API is open."""

    def __init__(self, path: Path | None, literal: str | None = None) -> None:
        self.path = path
        self._literal = (ApiKey(name=ENV_KEY_NAME, sha256=hash_key(literal)),) if literal else ()
        self._ring: KeyRing | None = None
        if path is not None or self._literal:
            self._ring = KeyRing(self._literal)
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if path is not None:
            self._load(self._file_stamp(), initial=True)
            self._next_check = time.monotonic() + RECHECK_S

    @property
    def enabled(self) -> bool:
        return self._ring is not None

    def ring(self) -> KeyRing | None:
        if self.path is not None:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + RECHECK_S
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._load(stamp, initial=False)
        return self._ring

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _load(self, stamp: tuple[int, int, int] | None, *, initial: bool) -> None:
        assert self.path is not None
        self._stamp = stamp  # a bad file is reported once, not every second
        try:
            keys = read_keys(self.path) if stamp is not None else []
        except ConfigError as exc:
            if initial:
                raise
            log.error("keys file unusable: keeping the keys read before", extra={"error": str(exc)})
            return
        self._ring = KeyRing((*self._literal, *keys))
        if not initial:
            log.info("keys file reloaded", extra={"path": str(self.path), "keys": len(keys)})
        elif not self._ring:
            log.warning(
                "no API keys yet: every /v1 request is refused until `cortex keys add`",
                extra={"path": str(self.path)},
            )
