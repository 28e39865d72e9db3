"""encore_fast: fast lifelong knowledge editing (ENCORE, MEMIT, AlphaEdit)."""
