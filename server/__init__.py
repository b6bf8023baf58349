"""HTTP inference server for DistriNews checkpoints: `python -m server --checkpoint DIR`."""

from server.app import create_app

__all__ = ["create_app"]
