"""The engine: resolve names, schedule blob fetches, single-flight, into the store."""

from fetchd.engine.pull import Engine, PullResult

__all__ = ["Engine", "PullResult"]
