"""The CUDA path of the lazy loader; skipped where there is no CUDA device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loaders.client import ParamClient
from loaders.models import load_lazy_model
from param_server.checkpoints import import_checkpoint
from param_server.service import ServerConfig, create_server
from param_server.store import Store
from tests.conftest import Checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def target(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> Iterator[str]:
    store = Store(tmp_path / "s")
    for tag in ("mixtral-float32", "qwen3_moe-bfloat16"):
        import_checkpoint(store, checkpoints[tag].path, tag)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


@pytest.mark.parametrize("tag", ["mixtral-float32", "qwen3_moe-bfloat16"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_cuda_logits_equal_eager_on_cuda(
    target: str, checkpoints: dict[str, Checkpoint], tag: str, fraction: float
) -> None:
    ref = (
        AutoModelForCausalLM.from_pretrained(
            checkpoints[tag].path, dtype="auto", experts_implementation="eager"
        )
        .to("cuda")
        .eval()
    )
    with ParamClient(target) as c:
        sizes = [
            s.size for k, s in c.get_manifest(tag).shards.items() if ".experts." in k
        ]
        budget = max(max(sizes), int(sum(sizes) * fraction))
        lm = load_lazy_model(c, tag, budget_bytes=budget, device="cuda")
        ids = torch.arange(96, device="cuda").remainder(128).view(2, 48)
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(ref(ids).logits, lm.model(ids).logits)
        st = lm.loader.stats()
        assert st.peak_resident_bytes <= budget
        assert (st.evictions > 0) == (fraction < 1.0)
        with lm.loader.acquire(0, [0]) as held:
            assert all(t.is_cuda for t in held[0].values())
        # Copies ran on the loader's own stream, not the compute stream.
        assert lm.loader._copy_stream is not None
        assert lm.loader._copy_stream != torch.cuda.current_stream()
        lm.close()
