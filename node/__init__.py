"""The node: app, config, CLI, storage, auth, router, usage and metrics."""

__version__ = "0.1.0"
