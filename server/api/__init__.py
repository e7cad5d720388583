"""The HTTP layer: app factory, protocol models, routes, one error envelope."""

from server.api.app import create_app

__all__ = ["create_app"]
