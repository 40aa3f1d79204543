"""Sources: resolvers (name → digest, from an authority) and fetchers (digest → bytes)."""
