"""The endpoint for a configured wire API: OpenAI chat completions or Anthropic Messages.
Apart from ``endpoint`` (the shared types every wire module imports), so that no module
imports one that imports it back."""

from __future__ import annotations

from helexa.acp.anthropic_messages import AnthropicMessagesEndpoint
from helexa.acp.config import EndpointConfig
from helexa.acp.endpoint import Endpoint
from helexa.acp.openai_chat import OpenAIChatEndpoint


def make_endpoint(config: EndpointConfig) -> Endpoint:
    if config.wire_api == "anthropic-messages":
        return AnthropicMessagesEndpoint(config)
    return OpenAIChatEndpoint(config)
