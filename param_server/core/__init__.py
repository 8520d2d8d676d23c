"""The contract between the daemon, its clients and the institutions.

Errors (one table: error, gRPC status, exit code, retryable), names and their
validation, shard keys and model families, the manifest, the safetensors
format and tensor codec, chunk framing, the Redis announcement format, write
results, credentials and the one backoff policy. Every side imports it; it
imports nothing else of the project.
"""
