"""Process limits a daemon raises for itself at start.

Every proxied stream holds two sockets in cortex (client and neuron) and one in the
neuron; at the common default soft limit of 1 024 open files cortex failed 992 of 1 000
concurrent streams. The systemd units set ``LimitNOFILE``; this raises the soft limit to
the hard one for every other way of starting a daemon (a shell, a container, ``cortex up``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("helexa.limits")

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]


@dataclass(frozen=True)
class NofileLimit:
    before: int  # soft limit found at start (-1: unlimited, or unknown off POSIX)
    soft: int  # soft limit now
    hard: int


def _finite(value: int) -> int:
    return -1 if resource is not None and value == resource.RLIM_INFINITY else value


def raise_nofile(want: int | None = None) -> NofileLimit:
    """Raise the soft RLIMIT_NOFILE to ``want`` (default: the hard limit), never above the
    hard limit and never lower than it already is; log the result at info."""
    if resource is None:
        return NofileLimit(-1, -1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard) if target != resource.RLIM_INFINITY else hard
    before = soft
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            # e.g. macOS refuses RLIM_INFINITY for NOFILE: keep what we have
            log.warning(
                "cannot raise the open-file limit",
                extra={"soft": soft, "hard": _finite(hard), "error": str(exc)},
            )
        else:
            soft = target
    limit = NofileLimit(_finite(before), _finite(soft), _finite(hard))
    log.info(
        "open-file limit",
        extra={"nofile": limit.soft, "nofile_hard": limit.hard, "was": limit.before},
    )
    if 0 <= limit.soft < 4096:
        log.warning(
            "open-file limit is low: each stream needs a socket (cortex: two); raise "
            "LimitNOFILE (systemd) or ulimit -n",
            extra={"nofile": limit.soft},
        )
    return limit
