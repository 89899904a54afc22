"""helexa: self-hosted LLM serving — cortex (gateway) and neuron (per-host daemon)."""

__version__ = "0.1.0"
