"""Harnesses: in-process inference engines behind one small interface."""
