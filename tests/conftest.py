"""Shared fixtures: tiny transformers MoE checkpoints and a real server on port 0."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from param_server.client import ParamClient
from param_server.launch.tiny import tiny_mixtral
from param_server.server.config import ServerConfig
from param_server.server.redis_server import EmbeddedRedis
from param_server.server.service import create_server
from param_server.store import Store


def _mixtral(dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    return tiny_mixtral(dtype=dtype)


def _qwen3_moe(dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        max_position_embeddings=64,
        dtype=dtype,
    )
    return Qwen3MoeForCausalLM(cfg).to(dtype).eval()


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}


@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    """Tiny checkpoints saved with a small max_shard_size (so with an index)."""
    out = {}
    for name, build in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            model = build(dtype)
            tag = f"{name}-{str(dtype).removeprefix('torch.')}"
            path = tmp_path_factory.mktemp(tag)
            model.save_pretrained(path, max_shard_size="40KB")
            out[tag] = Checkpoint(path, model)
    return out


@dataclass
class Server:
    target: str
    store_path: Path
    server: object

    def store(self) -> Store:
        return Store(self.store_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "store", listen="127.0.0.1:0")
    )
    srv.start()
    try:
        yield Server(f"127.0.0.1:{port}", tmp_path / "store", srv)
    finally:
        srv.stop(0).wait()


@pytest.fixture
def client(server: Server) -> Iterator[ParamClient]:
    """A client that always streams (the same-host path is tested on its own)."""
    with ParamClient(server.target, same_host=False, retries=1) as c:
        yield c


@pytest.fixture
def redis_srv() -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free loopback port (not restarted when killed)."""
    with EmbeddedRedis(supervise=False).start() as r:
        yield r


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `where` (needs root; the test is
    skipped otherwise), unmounted afterwards."""
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_read_only(mnt: Path) -> None:
    """Makes a tmpfs from `tmpfs` read-only (the test is skipped if it cannot)."""
    r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {r.stderr.decode().strip()}")
