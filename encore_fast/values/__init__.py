"""encore_fast.values."""
