"""The ACP agent: the SDK routes each JSON-RPC request to a method here (``acp.run_agent``
builds the connection; ``on_connect`` hands us the client side to call back).

One ``LiveSession`` per session in use; its turn runs in a task of its own so that
``session/cancel`` (or a new prompt) can cancel it while the ``session/prompt`` request
waits for it and answers ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acp import PROTOCOL_VERSION, RequestError
from acp.helpers import update_current_mode
from acp.schema import (
    AgentCapabilities,
    AuthenticateResponse,
    ConfigOptionUpdate,
    Implementation,
    InitializeResponse,
    ListSessionsResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PromptCapabilities,
    PromptResponse,
    SessionCapabilities,
    SessionConfigOptionSelect,
    SessionInfo,
    SessionInfoUpdate,
    SessionListCapabilities,
    SetSessionConfigOptionResponse,
    SetSessionModeResponse,
    Usage,
)

from helexa import __version__
from helexa.acp.config import AcpConfig
from helexa.acp.endpoint import Endpoint, EndpointError, ModelCache
from helexa.acp.history import prompt_text, replay, user_message
from helexa.acp.loop import Turn, TurnResult
from helexa.acp.options import (
    ENDPOINT_OPTION,
    MODE_OPTION,
    MODEL_OPTION,
    config_options,
    mode_state,
    model_choices,
)
from helexa.acp.policy import MODE_IDS
from helexa.acp.store import (
    SessionStore,
    StoredSession,
    new_session_id,
    now_iso,
    same_dir,
    snapshot,
    title_from,
)
from helexa.acp.toolrun import ToolRunner
from helexa.acp.ui import AcpUi
from helexa.acp.wires import make_endpoint
from helexa.acp.workspace import ClientCaps, Workspace

log = logging.getLogger("helexa.acp.agent")

LIST_PAGE = 100
SHUTDOWN_WAIT_S = 10.0  # for live turns to unwind (and save) when the connection closes


@dataclass
class LiveSession:
    record: StoredSession
    turn: asyncio.Task[TurnResult] | None = None
    cancel_sent: bool = False  # the running turn was cancelled already
    # A session/cancel came while a prompt waited for the previous turn to unwind: that
    # prompt must not start its own.
    cancel_requested: bool = False


def _blocks(prompt: list[Any]) -> list[dict[str, Any]]:
    return [b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in prompt]


class HelexaAgent:
    """Implements the SDK's ``acp.Agent`` interface (duck-typed: methods we do not offer
    stay "method not found")."""

    def __init__(
        self,
        config: AcpConfig,
        store: SessionStore | None = None,
        endpoint_factory: Any = make_endpoint,
    ) -> None:
        self.config = config
        self.store = store or SessionStore(config.sessions_dir or Path("sessions"))
        self._endpoint_factory = endpoint_factory
        self._endpoints: dict[str, Endpoint] = {}
        self._models = ModelCache()
        self._live: dict[str, LiveSession] = {}
        self._conn: Any = None
        self._caps = ClientCaps()
        self._save_seq = 0

    # -- plumbing ---------------------------------------------------------------------

    def on_connect(self, conn: Any) -> None:
        self._conn = conn

    def _endpoint(self, name: str | None) -> Endpoint:
        config = self.config.endpoint(name)
        if config.name not in self._endpoints:
            self._endpoints[config.name] = self._endpoint_factory(config)
        return self._endpoints[config.name]

    async def aclose(self) -> None:
        """Cancel the turns still running and let them unwind (they save the session) before
        their HTTP clients close under them."""
        turns = [t for live in self._live.values() if (t := live.turn) and not t.done()]
        for task in turns:
            task.cancel()
        if turns:
            await asyncio.wait(turns, timeout=SHUTDOWN_WAIT_S)
        for endpoint in self._endpoints.values():
            with contextlib.suppress(Exception):
                await endpoint.aclose()

    async def _save(self, record: StoredSession) -> None:
        """Save off the event loop (fsync can take a while); the snapshot is taken here, in
        order, so a slow write never lands over a newer one."""
        record.updated_at = now_iso()
        data = snapshot(record)
        self._save_seq += 1
        try:
            await asyncio.to_thread(self.store.write, record.id, data, self._save_seq)
        except OSError as exc:  # keep serving; the log says the session is not on disk
            log.error("session save failed", extra={"session_id": record.id, "err": str(exc)})

    def _session(self, session_id: str) -> LiveSession:
        live = self._live.get(session_id)
        if live is None:
            record = self.store.load(session_id)
            if record is None:
                raise RequestError.invalid_params({"sessionId": session_id, "error": "unknown"})
            live = self._live[session_id] = LiveSession(record)
        return live

    async def _model_ids(self, endpoint_name: str | None, *, fresh: bool = False) -> list[str]:
        config = self.config.endpoint(endpoint_name)
        cached = None if fresh else self._models.get(config.name)
        if cached is not None:
            return cached
        try:
            ids = await self._endpoint(config.name).list_models(self.config.models_timeout_s)
        except EndpointError as exc:
            log.warning("model list unavailable", extra={"endpoint": config.name, "err": str(exc)})
            return []
        self._models.put(config.name, ids)
        return ids

    async def _config_options(self, record: StoredSession) -> list[SessionConfigOptionSelect]:
        endpoint = self.config.endpoint(record.endpoint)
        models = model_choices(await self._model_ids(endpoint.name), endpoint.model, record.model)
        names = [e.name for e in self.config.endpoints]
        return config_options(record.mode, record.model, models, endpoint.name, names)

    async def _notify(self, session_id: str, update: Any) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.session_update(session_id=session_id, update=update)

    # -- lifecycle --------------------------------------------------------------------

    async def initialize(
        self,
        protocol_version: int,
        client_capabilities: Any = None,
        client_info: Any = None,
        **kwargs: Any,
    ) -> InitializeResponse:
        self._caps = ClientCaps.from_acp(client_capabilities)
        log.info(
            "initialize",
            extra={
                "client": getattr(client_info, "name", None),
                "protocol": protocol_version,
                "fs_read": self._caps.read_text_file,
                "fs_write": self._caps.write_text_file,
                "terminal": self._caps.terminal,
            },
        )
        return InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            agent_capabilities=AgentCapabilities(
                load_session=True,
                # Text, resource links and embedded text resources; no images or audio.
                prompt_capabilities=PromptCapabilities(
                    image=False, audio=False, embedded_context=True
                ),
                session_capabilities=SessionCapabilities(list=SessionListCapabilities()),
            ),
            agent_info=Implementation(name="helexa-acp", title="helexa", version=__version__),
            auth_methods=[],
        )

    async def authenticate(self, method_id: str, **kwargs: Any) -> AuthenticateResponse:
        return AuthenticateResponse()

    async def new_session(
        self,
        cwd: str,
        additional_directories: list[str] | None = None,
        mcp_servers: list[Any] | None = None,
        **kwargs: Any,
    ) -> NewSessionResponse:
        if not os.path.isabs(cwd):
            raise RequestError.invalid_params({"cwd": cwd, "error": "must be an absolute path"})
        endpoint = self.config.endpoint()
        record = StoredSession(
            id=new_session_id(),
            cwd=os.path.normpath(cwd),
            mode=self.config.default_mode,
            endpoint=endpoint.name,
            model=endpoint.model,
        )
        self._live[record.id] = LiveSession(record)
        await self._save(record)
        log.info("session new", extra={"session_id": record.id, "cwd": record.cwd})
        return NewSessionResponse(
            session_id=record.id,
            modes=mode_state(record.mode),
            config_options=await self._config_options(record),
        )

    async def load_session(
        self,
        cwd: str,
        session_id: str,
        mcp_servers: list[Any] | None = None,
        additional_directories: list[str] | None = None,
        **kwargs: Any,
    ) -> LoadSessionResponse:
        live = self._live.get(session_id)
        record = live.record if live else self.store.load(session_id)
        if record is None:
            raise RequestError.resource_not_found(session_id)
        if live is None:
            live = self._live[session_id] = LiveSession(record)
        if os.path.isabs(cwd) and not same_dir(cwd, record.cwd):
            record.cwd = os.path.normpath(cwd)  # the project moved; follow the editor
        updates = replay(record.messages, record.cwd)
        for update in updates:
            await self._conn.session_update(session_id=session_id, update=update)
        log.info("session load", extra={"session_id": session_id, "replayed": len(updates)})
        return LoadSessionResponse(
            modes=mode_state(record.mode), config_options=await self._config_options(record)
        )

    async def list_sessions(
        self, cwd: str | None = None, cursor: str | None = None, **kwargs: Any
    ) -> ListSessionsResponse:
        sessions = [s for s in self.store.all() if cwd is None or same_dir(s.cwd, cwd)]
        start = int(cursor) if cursor and cursor.isdigit() else 0
        page = sessions[start : start + LIST_PAGE]
        more = start + LIST_PAGE < len(sessions)
        return ListSessionsResponse(
            sessions=[
                SessionInfo(session_id=s.id, cwd=s.cwd, title=s.title, updated_at=s.updated_at)
                for s in page
            ],
            next_cursor=str(start + LIST_PAGE) if more else None,
        )

    # -- settings ---------------------------------------------------------------------

    async def _set_mode(self, live: LiveSession, mode_id: str) -> None:
        if mode_id not in MODE_IDS:
            raise RequestError.invalid_params({"modeId": mode_id, "available": list(MODE_IDS)})
        live.record.mode = mode_id
        await self._save(live.record)
        log.info("mode", extra={"session_id": live.record.id, "mode": mode_id})

    async def set_session_mode(
        self, session_id: str, mode_id: str, **kwargs: Any
    ) -> SetSessionModeResponse:
        live = self._session(session_id)
        await self._set_mode(live, mode_id)
        options = await self._config_options(live.record)
        await self._notify(
            session_id,
            ConfigOptionUpdate(session_update="config_option_update", config_options=options),
        )
        return SetSessionModeResponse()

    async def _set_model(self, live: LiveSession, value: str) -> None:
        record = live.record
        endpoint = self.config.endpoint(record.endpoint)
        for fresh in (False, True):
            served = await self._model_ids(endpoint.name, fresh=fresh)
            if value in model_choices(served, endpoint.model, record.model):
                record.model = value
                await self._save(record)
                log.info("model", extra={"session_id": record.id, "model": value})
                return
        raise RequestError.invalid_params({"configId": MODEL_OPTION, "value": value})

    async def set_config_option(
        self, config_id: str, session_id: str, value: str | bool, **kwargs: Any
    ) -> SetSessionConfigOptionResponse:
        live = self._session(session_id)
        if not isinstance(value, str):
            raise RequestError.invalid_params(
                {"configId": config_id, "error": "expects a value id"}
            )
        if config_id == MODE_OPTION:
            await self._set_mode(live, value)
            await self._notify(session_id, update_current_mode(value))
        elif config_id == MODEL_OPTION:
            await self._set_model(live, value)
        elif config_id == ENDPOINT_OPTION and value in [e.name for e in self.config.endpoints]:
            live.record.endpoint = value
            live.record.model = self.config.endpoint(value).model
            await self._save(live.record)
        else:
            raise RequestError.invalid_params({"configId": config_id, "value": value})
        return SetSessionConfigOptionResponse(
            config_options=await self._config_options(live.record)
        )

    async def set_session_model(self, session_id: str, model_id: str, **kwargs: Any) -> None:
        """``session/set_model`` of SDKs that route it (0.12 does not): same as the option."""
        await self._set_model(self._session(session_id), model_id)

    # -- prompting --------------------------------------------------------------------

    async def _stop_turn(self, live: LiveSession) -> None:
        """Cancel the turn in flight, if any, and wait until it has unwound."""
        task = live.turn
        if task is None or task.done():
            return
        if not live.cancel_sent:
            live.cancel_sent = True
            task.cancel()
        await asyncio.wait({task})

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> PromptResponse:
        live = self._session(session_id)
        live.cancel_requested = False  # a cancel from before this prompt was not for it
        # One turn at a time per session; loop: another prompt may have started one meanwhile.
        while live.turn is not None and not live.turn.done():
            await self._stop_turn(live)
        if live.cancel_requested:  # cancelled while the previous turn unwound
            return PromptResponse(stop_reason="cancelled")
        blocks = _blocks(prompt)
        task = asyncio.create_task(self._run_turn(live, blocks), name=f"turn-{session_id}")
        live.turn, live.cancel_sent = task, False
        try:
            result = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we ourselves are being cancelled (the connection is closing)
            result = TurnResult("cancelled")  # cancelled before the turn even started
        finally:
            if live.turn is task:
                live.turn = None
        usage = None
        if result.input_tokens or result.output_tokens:
            usage = Usage(
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                total_tokens=result.input_tokens + result.output_tokens,
            )
        return PromptResponse(stop_reason=result.stop_reason, usage=usage)  # type: ignore[arg-type]

    async def _run_turn(self, live: LiveSession, blocks: list[dict[str, Any]]) -> TurnResult:
        record = live.record
        if record.title is None:
            record.title = title_from(prompt_text(blocks))
        endpoint_config = self.config.endpoint(record.endpoint)
        ui = AcpUi(self._conn, record.id)
        workspace = Workspace(
            self._conn,
            record.id,
            self._caps,
            timeout_s=self.config.bash_timeout_s,
            output_limit=self.config.bash_output_limit,
        )
        tools = ToolRunner(workspace, ui, record, output_limit=self.config.tool_output_limit)
        turn = Turn(
            session=record,
            endpoint=self._endpoint(endpoint_config.name),
            endpoint_config=endpoint_config,
            tools=tools,
            ui=ui,
            save=lambda: self._save(record),
            max_rounds=self.config.max_rounds,
        )
        result = await turn.run(user_message(blocks))
        await self._notify(
            record.id,
            SessionInfoUpdate(
                session_update="session_info_update",
                title=record.title,
                updated_at=record.updated_at,
            ),
        )
        return result

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        live = self._live.get(session_id)
        if live is None:
            return
        live.cancel_requested = True
        if live.turn is None or live.turn.done() or live.cancel_sent:
            return
        live.cancel_sent = True
        live.turn.cancel()
        log.info("cancel", extra={"session_id": session_id})

    # -- extensions -------------------------------------------------------------------

    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise RequestError.method_not_found(f"_{method}")

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        return None
