"""The daemon: the gRPC service over a store, its private Redis, the
announcer, and token checks."""
