"""helexa-acp: an Agent Client Protocol agent (JSON-RPC over stdio) that lets editors such as
Zed drive a model served by cortex (or any OpenAI/Anthropic-compatible endpoint), with tools
the agent runs through the editor."""

from helexa import __version__

__all__ = ["__version__"]
