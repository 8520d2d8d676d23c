"""What inference nodes import: the parameter-server client, and later the lazy
expert cache and hot swapper built on it."""

from loaders.client import FetchStats, ParamClient
from param_server.store import CommitResult, GcResult

__all__ = ["CommitResult", "FetchStats", "GcResult", "ParamClient"]
