"""The client of the daemon: typed calls with retries, verified parallel
fetches, same-host mapping, a disk tier and commits."""

from param_server.client.client import FetchStats, ParamClient
from param_server.client.disk_cache import DiskBlobCache
from param_server.core.auth import Credentials

__all__ = ["Credentials", "DiskBlobCache", "FetchStats", "ParamClient"]
