"""neuron: the per-host daemon (discovery, model lifecycle, inference: a worker per device)."""
