"""neuron: the per-host daemon (discovery, model lifecycle, inference in a worker process per device)."""
