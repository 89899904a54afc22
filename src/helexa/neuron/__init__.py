"""neuron: the per-GPU-host daemon (discovery, model lifecycle, in-process inference)."""
