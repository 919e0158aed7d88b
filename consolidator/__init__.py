"""consolidator: a host manager for server consolidation on Linux."""

__version__ = "0.1.0"
