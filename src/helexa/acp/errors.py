"""The error a tool raises to tell the model what went wrong."""

from __future__ import annotations


class ToolError(Exception):
    """A tool failed in a way the model should hear about (sent back as an error result)."""
