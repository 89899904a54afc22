"""Device worker processes: one per device, each owning the engines on it."""
