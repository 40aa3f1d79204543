"""appc: names, meta discovery, ACIs."""
