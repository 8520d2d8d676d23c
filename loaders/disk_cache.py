"""The client's disk tier, where inference nodes found it before it moved to
`param_server.client.disk_cache`."""

from param_server.client.disk_cache import DiskBlobCache

__all__ = ["DiskBlobCache"]
