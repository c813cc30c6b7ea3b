"""The broker server: the documented queue API, the routing core, the process."""

from .server import DEFAULT_ADDRESS, BrokerServer, serve

__all__ = ["DEFAULT_ADDRESS", "BrokerServer", "serve"]
