"""The param-server client, where inference nodes found it before it moved
to `param_server.client`."""

from param_server.client import FetchStats, ParamClient

__all__ = ["FetchStats", "ParamClient"]
