"""farworker: the Far Labs GPU mesh worker."""

__version__ = "0.1.0"
