"""The CUDA path of the lazy loader; skipped where there is no CUDA device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loaders.models import load_lazy_model
from param_server.client import ParamClient
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
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
@pytest.mark.parametrize(
    ("fraction", "implementation"),
    [
        (1.0, None),
        (1.0, "batched_mm"),
        (1.0, "eager"),
        (0.5, None),  # half the experts, in the pool: the stock kernel
        (0.5, "batched_mm"),
        (0.25, None),  # 2 slots, 4 experts routed: in groups on the pool
        (0.25, "batched_mm"),
        (0.25, "eager"),  # the eager loop on cached experts
    ],
)
def test_cuda_logits_equal_the_resident_model(
    target: str,
    checkpoints: dict[str, Checkpoint],
    tag: str,
    fraction: float,
    implementation: str | None,
) -> None:
    """At a full budget every expert is in its slot and the configured
    implementation (None: transformers' default) runs; below it the same
    implementation runs on the pool (in groups when a step routes to more
    experts than it holds), or the eager loop on cached experts. Either way:
    the resident model's logits."""
    with ParamClient(target) as c:
        sizes = [
            s.size for k, s in c.get_manifest(tag).shards.items() if ".experts." in k
        ]
        budget = max(max(sizes), int(sum(sizes) * fraction))
        lm = load_lazy_model(
            c,
            tag,
            budget_bytes=budget,
            device="cuda",
            experts_implementation=implementation,
        )
        ref = (
            AutoModelForCausalLM.from_pretrained(
                checkpoints[tag].path,
                dtype="auto",
                experts_implementation=lm.experts_implementation,
            )
            .to("cuda")
            .eval()
        )
        if fraction == 1.0 and implementation is None:
            assert lm.experts_implementation == ref.config._experts_implementation
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


def test_cuda_prefetch_brings_the_next_layers_experts_in(
    target: str, checkpoints: dict[str, Checkpoint]
) -> None:
    """Decoding one sequence with half the experts in the pool: the next
    layer's predicted experts come in on the copy stream while a layer
    computes, and generation is the resident model's, token for token."""
    tag = "qwen3_moe-bfloat16"
    with ParamClient(target) as c:
        sizes = [
            s.size for k, s in c.get_manifest(tag).shards.items() if ".experts." in k
        ]
        lm = load_lazy_model(
            c, tag, budget_bytes=sum(sizes) // 2, device="cuda", prefetch=True
        )
        ref = (
            AutoModelForCausalLM.from_pretrained(checkpoints[tag].path, dtype="auto")
            .to("cuda")
            .eval()
        )
        prompt = torch.arange(3, 7, device="cuda").view(1, 4)
        args = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            assert torch.equal(
                ref.generate(prompt, **args), lm.model.generate(prompt, **args)
            )
        lm.loader.settle()
        st = lm.loader.stats()
        assert st.prefetched > 0 and st.routed_after_prediction > 0
        assert st.peak_resident_bytes <= lm.loader.budget_bytes
        # generate decoded with batched_mm, as it does the resident model
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        layers = [m for m in lm.model.modules() if "_lazy_inner" in m.__dict__]
        with lm.model._optimize_model_for_decode():
            assert all(
                m._lazy_inner is ALL_EXPERTS_FUNCTIONS["batched_mm"] for m in layers
            )
        lm.close()


def test_cuda_hot_swap_matches_a_fresh_load(target: str) -> None:
    """Dense tensors and resident experts of a new version land on the GPU
    (no Redis here: the swapper is told to check by hand)."""
    from loaders.hotswap import HotSwapper
    from param_server.core import tensor_codec
    from param_server.server.redis_server import free_port

    tag = "mixtral-float32"
    ids = torch.arange(96, device="cuda").remainder(128).view(2, 48)
    with ParamClient(target) as c:
        lm = load_lazy_model(c, tag, budget_bytes=10**9, device="cuda")
        with torch.no_grad():
            before = lm.model(ids).logits
        sw = HotSwapper(lm, redis_url=f"redis://127.0.0.1:{free_port()}/0").start()
        m = c.get_manifest(tag)
        keys = ["layers.0.dense", "layers.1.experts.0", "layers.0.experts.1"]
        shards = {
            k: {n: t * 1.01 for n, t in tensor_codec.decode(buf, k).items()}
            for k, buf in c.fetch_blobs(m, keys).items()
        }
        v2 = c.commit(tag, m.version, shards).manifest.version
        sw.reconcile_now()
        assert sw.wait_for_version(v2, 30)
        fresh = load_lazy_model(c, tag, budget_bytes=10**9, device="cuda")
        with torch.no_grad():
            got = lm.model(ids).logits
            assert torch.equal(got, fresh.model(ids).logits)
        assert not torch.equal(got, before)
        assert all(p.is_cuda for p in lm.model.parameters())
        sw.stop()
        lm.close()
        fresh.close()


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]
)
def test_cuda_every_family_equals_the_resident_model(
    tmp_path: Path, model_type: str
) -> None:
    """Every family of the table (shared experts, a dense first layer, MLA
    attention among them), in bf16: every expert in its slot, then half and
    a quarter of them (steps launched ahead of the lookup, kept or redone;
    a slot per layer, steps in groups), under each implementation: logits
    and greedy generation (batched_mm decoding, as for the resident model)
    equal the resident model's."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    from tests.integration.test_lazy import _table_family

    small = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
    }
    if model_type == "mixtral":
        config = MixtralConfig(**small, num_local_experts=4)
    elif model_type == "qwen3_moe":
        config = Qwen3MoeConfig(**small, moe_intermediate_size=16, num_experts=4)
    else:
        config = _table_family(model_type)
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    import_checkpoint(Store(tmp_path / "s"), path, model_type)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    ids = torch.arange(96, device="cuda").remainder(128).view(2, 48)
    args = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            sizes = [
                s.size
                for k, s in c.get_manifest(model_type).shards.items()
                if ".experts." in k
            ]
            for implementation in ("grouped_mm", "batched_mm", "eager"):
                ref = (
                    AutoModelForCausalLM.from_pretrained(
                        path, dtype="auto", experts_implementation=implementation
                    )
                    .to("cuda")
                    .eval()
                )
                with torch.no_grad():
                    want = ref.generate(ids[:1, :4], **args)
                for fraction in (1.0, 0.5, 0.25):
                    budget = max(max(sizes), int(sum(sizes) * fraction))
                    lm = load_lazy_model(
                        c,
                        model_type,
                        budget_bytes=budget,
                        device="cuda",
                        experts_implementation=implementation,
                    )
                    with torch.no_grad():
                        for prompt in (ids, ids, ids[:1, :1]):
                            assert torch.equal(
                                ref(prompt).logits, lm.model(prompt).logits
                            ), (implementation, fraction)
                        got = lm.model.generate(ids[:1, :4], **args)
                    assert torch.equal(want, got), (implementation, fraction)
                    st = lm.loader.stats()
                    assert st.peak_resident_bytes <= budget
                    assert (st.evictions > 0) == (fraction < 1.0)
                    if fraction == 0.5 and lm.loader.pools is not None:
                        # steps launched ahead of the lookup, kept and redone
                        assert st.steps_on_map > 0 and st.steps_redone > 0
                    lm.close()
    finally:
        srv.stop(0)


@pytest.mark.parametrize("width", ["int8", "fp8"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_cuda_narrow_experts_equal_dequantized_on_arrival(
    target: str, width: str, fraction: float
) -> None:
    """8-bit experts kept narrow on the host and dequantized on the GPU (the
    CUDA default) compute what experts dequantized on the CPU on arrival
    compute, bit for bit, from slots, a pool and a pool smaller than a
    step's experts; the host tier holds about half the bytes."""
    tag = "qwen3_moe-bfloat16"
    ids = torch.arange(96, device="cuda").remainder(128).view(2, 48)
    with ParamClient(target) as c:
        m = c.get_manifest(tag)
        every = sum(s.size for k, s in m.shards.items() if ".experts." in k)
        out, host = [], []
        for keep in (False, True):
            lm = load_lazy_model(
                c,
                tag,
                budget_bytes=int(every * fraction),
                device="cuda",
                width=width,
                keep_narrow=keep,
                host_budget_bytes=10**9,
            )
            with torch.no_grad():
                out.append(lm.model(ids).logits)
                out.append(lm.model(ids.flip(0)).logits)  # misses from the host
            host.append(lm.loader.stats().host_bytes)
            lm.close()
        assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])
        if fraction < 1.0:
            assert 0.45 < host[1] / host[0] < 0.6
