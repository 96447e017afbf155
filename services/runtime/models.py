"""The runtime owns no tables: what it serves comes from the registry, and it keeps no state."""
