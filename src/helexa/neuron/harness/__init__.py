"""Harnesses: the inference engines behind one small interface (run inside a device worker)."""
