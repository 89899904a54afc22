"""Code shared by cortex and neuron: wire types, errors, config loading."""
