"""``cortex up``: a working local fleet in one command (a neuron and a gateway serving a
model), and the small models it and the tests build (a tiny random one, the SmolLM2 demo).
Its own package: neither daemon depends on it."""
