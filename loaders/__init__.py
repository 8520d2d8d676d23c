"""What inference nodes import: the parameter-server client, and later the lazy
expert cache and hot swapper built on it."""

from loaders.client import CommitResult, FetchStats, ParamClient

__all__ = ["CommitResult", "FetchStats", "ParamClient"]
