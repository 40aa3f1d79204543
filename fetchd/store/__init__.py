"""The content-addressed store (DESIGN.md §3): ingest → commit, the OCI layout, metadata."""

from fetchd.store.cas import Ingest, Store

__all__ = ["Ingest", "Store"]
