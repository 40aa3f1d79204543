"""fetchd serve: the LAN cache — a read-only, pull-through OCI registry on the store."""
