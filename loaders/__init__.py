"""What inference nodes import: the parameter-server client (lazy loading and hot swaps build on it)."""

from loaders.client import CommitResult, FetchStats, ParamClient

__all__ = ["CommitResult", "FetchStats", "ParamClient"]
