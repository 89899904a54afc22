"""Real cortex processes in front of real neurons, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from tests.support.procs import Daemon, console_script, free_port


def start_cortex(
    workdir: Path,
    neurons: dict[str, str],
    models_toml: str,
    *,
    extra: str = "",
    name: str = "cortex",
    poll_interval_s: float = 0.3,
    poller: str = "timeout_s = 2\n",
    prefix: list[str] | None = None,
    gateway: str = "",
) -> tuple[Daemon, str, str]:
    """Returns the daemon, its API base URL and its metrics base URL. ``extra``: top-level
    cortex.toml lines and tables; ``gateway``: more lines of its ``[gateway]`` table."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    (workdir / f"{name}-models.toml").write_text(models_toml)
    entries = "".join(
        f'[[neurons]]\nname = "{n}"\nendpoint = "{url}"\n' for n, url in neurons.items()
    )
    config = workdir / f"{name}.toml"
    config.write_text(
        f'models_config = "{name}-models.toml"\n{extra}\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
        f"{gateway}\n"
        f"[poller]\ninterval_s = {poll_interval_s}\n{poller}{entries}"
    )
    daemon = Daemon(
        [*(prefix or []), console_script("cortex"), "serve", "--config", str(config)],
        log_path=workdir / f"{name}.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    daemon.wait_http(f"{base}/health")
    return daemon, base, f"http://127.0.0.1:{metrics_port}"
