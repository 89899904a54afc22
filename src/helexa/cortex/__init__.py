"""cortex: the gateway — one OpenAI API in front of every neuron."""
