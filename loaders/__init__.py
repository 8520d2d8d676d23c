"""What inference nodes import: the parameter-server client, the lazy expert
cache, and transformers MoE models whose experts load on demand."""

from loaders.cache import CacheStats, ExpertFetchError, LazyExpertLoader
from loaders.client import FetchStats, ParamClient
from loaders.models import FAMILIES, LazyFamily, LazyModel, load_lazy_model
from param_server.store import CommitResult, GcResult

__all__ = [
    "FAMILIES",
    "CacheStats",
    "CommitResult",
    "ExpertFetchError",
    "FetchStats",
    "GcResult",
    "LazyExpertLoader",
    "LazyFamily",
    "LazyModel",
    "ParamClient",
    "load_lazy_model",
]
