"""What inference nodes import: the parameter-server client, the lazy expert
cache, transformers MoE models whose experts load on demand, and the hot
swapper that keeps them on the newest version."""

from loaders.cache import CacheStats, ExpertFetchError, LazyExpertLoader
from loaders.eviction import EvictionPolicy, FrequencyPolicy, LRUPolicy
from loaders.hotswap import HotSwapper, SwapError
from loaders.models import LazyModel, load_lazy_model
from param_server.client import DiskBlobCache, FetchStats, ParamClient
from param_server.core.announcements import NodeStatus
from param_server.core.results import CommitResult, GcResult
from param_server.core.shards import FAMILIES, ModelFamily

LazyFamily = ModelFamily  # the name of a row of FAMILIES before it had one owner

__all__ = [
    "FAMILIES",
    "CacheStats",
    "CommitResult",
    "DiskBlobCache",
    "EvictionPolicy",
    "ExpertFetchError",
    "FetchStats",
    "FrequencyPolicy",
    "GcResult",
    "HotSwapper",
    "LRUPolicy",
    "LazyExpertLoader",
    "LazyFamily",
    "LazyModel",
    "ModelFamily",
    "NodeStatus",
    "ParamClient",
    "SwapError",
    "load_lazy_model",
]
