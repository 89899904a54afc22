"""``helexa-acp``: run the agent on stdio (what an editor starts), or ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from acp import run_agent

from helexa import __version__
from helexa.acp.agent import HelexaAgent
from helexa.acp.config import AcpConfig, load_config
from helexa.acp.logs import setup_file_logging
from helexa.core.settings import ConfigError

log = logging.getLogger("helexa.acp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helexa-acp",
        description="Agent Client Protocol agent over stdio (start it from an editor such as "
        "Zed). Config: ~/.config/helexa-acp/config.toml and HELEXA_ACP_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"helexa-acp {__version__}")
    parser.add_argument(
        "--config", type=Path, help="config file (same as HELEXA_ACP_CONFIG)", default=None
    )
    return parser


async def serve(config: AcpConfig) -> None:
    agent = HelexaAgent(config)
    try:
        await run_agent(agent)
    finally:
        await agent.aclose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config is not None:
        os.environ["HELEXA_ACP_CONFIG"] = str(args.config)
    try:
        config = load_config()
    except ConfigError as exc:
        # Before the protocol starts: stderr is all there is (an editor logs it).
        print(f"helexa-acp: {exc}", file=sys.stderr)
        return 2
    assert config.log_file is not None
    setup_file_logging(config.log_file, config.log_level)
    endpoint = config.endpoint()
    log.info(
        "start",
        extra={
            "version": __version__,
            "endpoint": endpoint.name,
            "base_url": endpoint.base_url,
            "wire_api": endpoint.wire_api,
            "model": endpoint.model,
            "sessions_dir": str(config.sessions_dir),
            "pid": os.getpid(),
        },
    )
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130
    log.info("stop")
    return 0
