"""The versioned, content-addressed store on disk, and checkpoint folders in
and out of it (`param_server.store.checkpoints`)."""

from param_server.store.store import Store, check_model_file, utc_now

__all__ = ["Store", "check_model_file", "utc_now"]
