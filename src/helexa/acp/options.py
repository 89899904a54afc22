"""A session's modes and config options as ACP shows them (pure).

Config options: ``mode`` (the same three modes, for clients that prefer config options),
``model`` (what the endpoint's ``GET /models`` serves) and, with more than one endpoint
configured, ``endpoint``.
"""

from __future__ import annotations

from acp.schema import (
    SessionConfigOptionSelect,
    SessionConfigSelectOption,
    SessionMode,
    SessionModeState,
)

from helexa.acp.policy import MODES

MODE_OPTION = "mode"
MODEL_OPTION = "model"
ENDPOINT_OPTION = "endpoint"


def mode_state(current: str) -> SessionModeState:
    return SessionModeState(
        current_mode_id=current,
        available_modes=[
            SessionMode(id=m.id, name=m.name, description=m.description) for m in MODES
        ],
    )


def model_choices(served: list[str], configured: str, current: str) -> list[str]:
    """The model picker's values: what is served, plus the current and configured models
    when the endpoint does not list them (the current value must be among the options)."""
    ordered = [current, configured, *served] if current not in served else [*served]
    if configured not in ordered:
        ordered.append(configured)
    unique: list[str] = []
    for name in ordered:
        if name not in unique:
            unique.append(name)
    return unique


def config_options(
    mode: str, model: str, models: list[str], endpoint: str, endpoints: list[str]
) -> list[SessionConfigOptionSelect]:
    options = [
        SessionConfigOptionSelect(
            id=MODE_OPTION,
            name="Mode",
            category="mode",
            type="select",
            current_value=mode,
            options=[
                SessionConfigSelectOption(value=m.id, name=m.name, description=m.description)
                for m in MODES
            ],
        ),
        SessionConfigOptionSelect(
            id=MODEL_OPTION,
            name="Model",
            category="model",
            type="select",
            current_value=model,
            options=[SessionConfigSelectOption(value=m, name=m) for m in models],
        ),
    ]
    if len(endpoints) > 1:
        options.append(
            SessionConfigOptionSelect(
                id=ENDPOINT_OPTION,
                name="Endpoint",
                type="select",
                current_value=endpoint,
                options=[SessionConfigSelectOption(value=e, name=e) for e in endpoints],
            )
        )
    return options
