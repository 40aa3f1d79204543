"""fetchd: fetch container images fast into one verified content-addressed store."""

__version__ = "0.1.0"
