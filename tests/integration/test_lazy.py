"""Lazy expert loading against a real server and real transformers MoE models."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from loaders.cache import ExpertFetchError, LazyExpertLoader
from loaders.models import LazyModel, load_lazy_model
from param_server.client import ParamClient
from param_server.core.errors import InvalidInputError, UnavailableError
from param_server.core.shards import by_expert_suffix, is_expert_key
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
from tests.conftest import Checkpoint

pytestmark = pytest.mark.integration
TAGS = [
    "mixtral-float32",
    "qwen3_moe-float32",
    "mixtral-bfloat16",
    "qwen3_moe-bfloat16",
]


@dataclasses.dataclass
class Served:
    target: str
    store: Path
    server: grpc.Server


@pytest.fixture(scope="module")
def served(
    checkpoints: dict[str, Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("lazy-store")
    store = Store(root)
    for tag in TAGS:
        import_checkpoint(store, checkpoints[tag].path, tag)
    srv, port, _ = create_server(ServerConfig(store=root, listen="127.0.0.1:0"))
    srv.start()
    yield Served(f"127.0.0.1:{port}", root, srv)
    srv.stop(0)


@pytest.fixture
def client(served: Served) -> Iterator[ParamClient]:
    with ParamClient(served.target, same_host=False, retries=1, backoff=0.01) as c:
        yield c


def eager(path: Path, implementation: str = "eager") -> torch.nn.Module:
    """The reference: transformers' own resident model, with its eager experts
    loop unless another implementation is named."""
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype="auto", experts_implementation=implementation
    )
    # Its weights in memory of its own, as after `.to("cuda")`: mapped from
    # the file they start at arbitrary byte offsets, and on the CPU a
    # one-token matrix-vector product sums in an order that depends on the
    # alignment (the resident model then differs from itself with copied
    # weights by ~1e-7 on one token; see BENCHMARKS.md).
    with torch.no_grad():
        for param in m.parameters():
            param.data = param.data.clone()
    return m.eval()  # type: ignore[no-any-return]


def expert_sizes(client: ParamClient, model: str) -> tuple[int, int]:
    """(total bytes of all experts, bytes of the largest)."""
    sizes = [
        s.size for k, s in client.get_manifest(model).shards.items() if is_expert_key(k)
    ]
    return sum(sizes), max(sizes)


def lazy(
    client: ParamClient,
    model: str,
    fraction: float,
    implementation: str | None = "eager",
    prefetch: bool | None = None,
) -> LazyModel:
    total, largest = expert_sizes(client, model)
    return load_lazy_model(
        client,
        model,
        budget_bytes=max(largest, int(total * fraction)),
        experts_implementation=implementation,
        prefetch=prefetch,
    )


PROMPT = torch.arange(3, 3 + 2 * 48).remainder(128).view(2, 48)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.125])
def test_logits_equal_eager_at_every_budget(
    client: ParamClient, checkpoints: dict[str, Checkpoint], tag: str, fraction: float
) -> None:
    """Below a full budget the eager loop runs on cached experts; at a full
    budget every expert is in its slot and the configured implementation runs
    (here eager); either way the logits are the resident model's."""
    ref = eager(checkpoints[tag].path)
    total, largest = expert_sizes(client, tag)
    lm = load_lazy_model(
        client,
        tag,
        budget_bytes=max(largest, int(total * fraction)),
        experts_implementation="eager",
    )
    try:
        with torch.no_grad():
            for _ in range(2):  # a second pass runs on what the first left cached
                assert torch.equal(ref(PROMPT).logits, lm.model(PROMPT).logits)
        st = lm.loader.stats()
        assert st.peak_resident_bytes <= lm.loader.budget_bytes
        if fraction < 1.0:
            assert st.evictions > 0  # eviction happened within the forward passes
        else:
            assert st.evictions == 0 and st.hits > 0
    finally:
        lm.close()


@pytest.mark.parametrize("tag", ["mixtral-float32", "qwen3_moe-bfloat16"])
def test_greedy_generation_is_identical(
    client: ParamClient, checkpoints: dict[str, Checkpoint], tag: str
) -> None:
    ref = eager(checkpoints[tag].path)
    lm = lazy(client, tag, 0.25)
    try:
        args = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            want = ref.generate(PROMPT[:1, :16], **args)
            got = lm.model.generate(PROMPT[:1, :16], **args)
        assert torch.equal(want, got)
        st = lm.loader.stats()
        assert st.evictions > 0 and st.peak_resident_bytes <= lm.loader.budget_bytes
    finally:
        lm.close()


def test_only_routed_experts_are_fetched(client: ParamClient) -> None:
    lm = lazy(client, "mixtral-float32", 0.9)  # a full budget fetches all at load
    try:
        with torch.no_grad():
            lm.model(PROMPT[:1, :1])  # one token routes to top-2 experts per layer
        assert lm.loader.stats().misses == 2 * 2
        assert len(lm.loader.resident()) == 4
    finally:
        lm.close()


def test_single_flight(client: ParamClient) -> None:
    loader = LazyExpertLoader.for_model(client, "mixtral-float32", budget_bytes=10**9)
    barrier = threading.Barrier(8)
    got: list[torch.Tensor] = []

    def worker() -> None:
        barrier.wait()
        with loader.acquire(1, [2]) as held:
            got.append(next(iter(held[2].values())))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = loader.stats()
    assert st.fetches == 1 and st.misses == 1 and st.hits == 7
    assert st.bytes_fetched == loader.expert_bytes(1, 2)
    assert all(g.data_ptr() == got[0].data_ptr() for g in got)  # one copy, shared
    loader.close()


def test_misses_of_one_pass_are_one_batched_fetch(client: ParamClient) -> None:
    loader = LazyExpertLoader.for_model(client, "qwen3_moe-float32", budget_bytes=10**9)
    with loader.acquire(0, [0, 1, 2, 3]):
        pass
    st = loader.stats()
    assert (st.misses, st.fetches) == (4, 1)
    assert set(st.miss_latency_ms) == {"p50", "p90", "p99", "max"}
    loader.close()


def test_budget_smaller_than_a_layers_experts_works_in_batches(
    client: ParamClient,
) -> None:
    _, largest = expert_sizes(client, "mixtral-float32")
    loader = LazyExpertLoader.for_model(client, "mixtral-float32", budget_bytes=largest)
    seen = [e for e, _ in loader.iter_experts(0, [0, 1, 2, 3])]
    st = loader.stats()
    assert seen == [0, 1, 2, 3] and st.fetches == 4 and st.evictions == 3
    assert st.peak_resident_bytes <= largest
    loader.close()


def test_prefetch_warms_and_pins_survive_pressure(client: ParamClient) -> None:
    _, largest = expert_sizes(client, "mixtral-float32")
    loader = LazyExpertLoader.for_model(
        client, "mixtral-float32", budget_bytes=3 * largest
    )
    loader.prefetch(0, [0, 1]).result(timeout=30)
    assert loader.resident() == {(0, 0), (0, 1)} and loader.stats().prefetched == 2
    with loader.acquire(0, [0, 1]):
        pass
    assert loader.stats().hits == 2
    loader.pin(1, [3])
    for e in range(4):
        with loader.acquire(0, [e]):
            pass
    assert (1, 3) in loader.resident()  # pinned: never the victim
    assert loader.stats().peak_resident_bytes <= 3 * largest
    loader.close()


@pytest.mark.parametrize("budget", [0, -5, 100])
def test_bad_budgets_are_refused(client: ParamClient, budget: int) -> None:
    with pytest.raises(InvalidInputError, match="budget"):
        LazyExpertLoader.for_model(client, "mixtral-float32", budget_bytes=budget)


def test_config_that_does_not_match_the_weights(
    served: Served, checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    store = Store(served.store)
    m = store.get_manifest("qwen3_moe-float32")
    cfg = json.loads(store.blob_path(m.files["config.json"].digest).read_bytes())
    original = dict(cfg)
    cfg["moe_intermediate_size"] = 24
    with store.staging() as s:
        s.add("config.json", json.dumps(cfg).encode(), is_file=True)
        store.commit("qwen3_moe-float32", m.version, s, message="wrong config")
    try:
        with ParamClient(served.target) as c:
            with pytest.raises(
                InvalidInputError,
                match=(
                    r"tensor 'model\.layers\.0\.mlp\.experts\.0\.\w+_proj\.weight' "
                    r"makes gate_up_proj of shape \[32, 32\] but the model built from "
                    r"config\.json expects \[48, 32\]"
                ),
            ):
                load_lazy_model(c, "qwen3_moe-float32", budget_bytes=10**9)
            cfg = {**original, "head_dim": 16}  # experts fine, attention wrong
            with store.staging() as s:
                s.add("config.json", json.dumps(cfg).encode(), is_file=True)
                store.commit("qwen3_moe-float32", m.version + 1, s)
            with pytest.raises(
                InvalidInputError,
                match=(
                    r"tensor 'model\.layers\.0\.self_attn\.k_norm\.weight' has shape "
                    r"\[8\] but the model built from config\.json expects \[16\]"
                ),
            ):
                load_lazy_model(c, "qwen3_moe-float32", budget_bytes=10**9)
    finally:
        store.rollback("qwen3_moe-float32", m.version)


def test_an_moe_imported_without_recognised_experts_is_refused_at_load(
    served: Served, checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "renamed"
    src.mkdir()
    ckpt = checkpoints["mixtral-float32"].path
    (src / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    tensors = {
        n: t for f in ckpt.glob("*.safetensors") for n, t in load_file(f).items()
    }
    save_file(
        {k.replace(".experts.", ".specialists."): v for k, v in tensors.items()},
        src / "model.safetensors",
    )
    import_checkpoint(Store(served.store), src, "renamed")
    with (
        ParamClient(served.target) as c,
        pytest.raises(InvalidInputError, match=r"has no expert shards.*FAMILIES"),
    ):
        load_lazy_model(c, "renamed", budget_bytes=10**9)


def test_server_unreachable_at_boot() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        ParamClient(f"127.0.0.1:{port}", retries=2, backoff=0.01) as c,
        pytest.raises(UnavailableError, match="UNAVAILABLE"),
    ):
        load_lazy_model(c, "m", budget_bytes=10**9)


def test_server_gone_mid_serving(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    tag = "mixtral-float32"
    import_checkpoint(Store(tmp_path / "s"), checkpoints[tag].path, tag)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    ref = eager(checkpoints[tag].path)
    with ParamClient(
        f"127.0.0.1:{port}", retries=2, backoff=0.01, same_host=False
    ) as c:
        # Experts on demand (a budget a byte short of them all, so that
        # resize below can evict), everything cached after one pass.
        lm = load_lazy_model(c, tag, budget_bytes=expert_sizes(c, tag)[0] - 1)
        with torch.no_grad():
            want = ref(PROMPT).logits
            assert torch.equal(lm.model(PROMPT).logits, want)  # everything now cached
            srv.stop(0).wait()
            assert torch.equal(lm.model(PROMPT).logits, want)  # cached experts serve on
            lm.loader.resize(lm.loader.expert_bytes(0, 0))  # evicts: misses from now on
            assert len(lm.loader.resident()) == 1
            with pytest.raises(
                ExpertFetchError,
                match=r"layer \d expert \d of "
                r"mixtral-float32@1: .*UNAVAILABLE",
            ):
                lm.model(PROMPT)
        assert c.stats.retries >= 1
        lm.close()


def test_corrupt_expert_is_never_used(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    tag = "qwen3_moe-float32"
    store = Store(tmp_path / "s")
    import_checkpoint(store, checkpoints[tag].path, tag)
    path = store.blob_path(store.get_manifest(tag).shards["layers.0.experts.1"].digest)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}", same_host=True) as c:
            loader = LazyExpertLoader.for_model(c, tag, budget_bytes=10**9)
            with (
                pytest.raises(ExpertFetchError, match=r"layer 0 expert 1 .*DATA_LOSS"),
                loader.acquire(0, [0, 1]),
            ):
                pass
            assert loader.resident() == set() and loader.stats().resident_bytes == 0
            with loader.acquire(0, [0]):  # the healthy one still loads
                pass
            loader.close()
    finally:
        srv.stop(0)


def test_eviction_policy_is_pluggable(client: ParamClient) -> None:
    class MostRecentFirst:
        def __init__(self) -> None:
            self.order: list[str] = []

        def used(self, key: str) -> None:
            self.order.remove(key)
            self.order.append(key)

        def added(self, key: str) -> None:
            self.order.append(key)

        def removed(self, key: str) -> None:
            self.order.remove(key)

        def victims(self) -> list[str]:
            return self.order[::-1]

    _, largest = expert_sizes(client, "mixtral-float32")
    loader = LazyExpertLoader.for_model(
        client, "mixtral-float32", budget_bytes=2 * largest, policy=MostRecentFirst()
    )
    for e in (0, 1, 2):
        with loader.acquire(0, [e]):
            pass
    assert loader.resident() == {(0, 0), (0, 2)}  # 1, the most recent, went first
    loader.close()


def _table_family(model_type: str):  # type: ignore[no-untyped-def]
    from transformers import DeepseekV3Config, OlmoeConfig, Qwen2MoeConfig

    common = {
        "vocab_size": 128,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
    }
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_key_value_heads=2,
            num_experts=4,
        )
    if model_type == "olmoe":
        return OlmoeConfig(
            **common, intermediate_size=16, num_key_value_heads=2, num_experts=4
        )
    # DeepSeek-V3: a dense first layer, MLA attention, one shared expert.
    return DeepseekV3Config(
        **{**common, "num_hidden_layers": 3},
        intermediate_size=64,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]


def _family_checkpoint(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], model_type: str
) -> Path:
    if model_type in ("mixtral", "qwen3_moe"):
        return checkpoints[f"{model_type}-bfloat16"].path
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(_table_family(model_type)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]
)
def test_a_small_budget_equals_the_resident_model_under_each_implementation(
    tmp_path: Path,
    checkpoints: dict[str, Checkpoint],
    model_type: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quarter of the experts fit (a slot per layer, and each token routes
    to 2 experts): under eager the loop runs on cached experts; under
    batched_mm and grouped_mm the stock implementation runs on the layer's
    pool, one expert at a time, with the next layer's routing predicted. The
    logits are the resident model's under the same implementation, bit for
    bit, in every family."""
    import loaders.models

    path = _family_checkpoint(tmp_path, checkpoints, model_type)
    import_checkpoint(Store(tmp_path / "s"), path, model_type)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    groups = []
    in_groups = loaders.models._in_groups

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        groups.append(1)
        return in_groups(*args, **kwargs)

    monkeypatch.setattr(loaders.models, "_in_groups", counted)
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            for implementation in IMPLEMENTATIONS:
                lm = lazy(c, model_type, 0.25, implementation, prefetch=True)
                try:
                    pooled = implementation != "eager"
                    assert (lm.loader.pools is not None) == pooled
                    if pooled:  # a slot per layer
                        assert lm.loader.pools is not None
                        assert [p.capacity for p in lm.loader.pools.values()] == [1, 1]
                    want = eager(path, implementation)
                    with torch.no_grad():
                        for prompt in (PROMPT, PROMPT, PROMPT[:1, :1]):
                            got = lm.model(prompt).logits
                            assert torch.equal(want(prompt).logits, got), implementation
                    st = lm.loader.stats()
                    assert st.evictions > 0
                    assert st.peak_resident_bytes <= lm.loader.budget_bytes
                    if pooled:  # the next layer's routing was predicted
                        assert st.predicted > 0 and st.routed_after_prediction > 0
                finally:
                    lm.close()
        assert groups  # the 4-expert steps ran in groups, not the eager loop
    finally:
        srv.stop(0)


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]
)
def test_a_full_budget_runs_the_stock_experts_implementations_exactly(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], model_type: str
) -> None:
    """Every expert in its slot: transformers' own experts implementations run
    on the model's own fused parameters, so the logits are the resident
    model's under each implementation, bit for bit, and the forward never
    asks the loader for an expert."""
    path = _family_checkpoint(tmp_path, checkpoints, model_type)
    import_checkpoint(Store(tmp_path / "s"), path, model_type)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            total, _ = expert_sizes(c, model_type)
            for implementation in IMPLEMENTATIONS:
                lm = load_lazy_model(
                    c,
                    model_type,
                    budget_bytes=total,
                    experts_implementation=implementation,
                )
                assert lm.experts_implementation == implementation
                fetches = lm.loader.stats().fetches
                with torch.no_grad():
                    got = lm.model(PROMPT).logits
                    want = eager(path, implementation)(PROMPT).logits
                assert torch.equal(want, got), implementation
                st = lm.loader.stats()
                assert st.fetches == fetches and st.hits > 0  # all from the slots
                assert st.peak_resident_bytes <= lm.loader.budget_bytes
                lm.close()
    finally:
        srv.stop(0)


def test_the_default_is_transformers_default_and_shrinking_is_refused(
    client: ParamClient,
) -> None:
    total, largest = expert_sizes(client, "mixtral-float32")
    lm = load_lazy_model(client, "mixtral-float32", budget_bytes=total)
    try:
        assert lm.experts_implementation == "grouped_mm"
        with pytest.raises(InvalidInputError, match="load the model again"):
            lm.loader.resize(largest)
    finally:
        lm.close()
    below = load_lazy_model(client, "mixtral-float32", budget_bytes=total - 1)
    assert below.experts_implementation == "grouped_mm"  # on demand, in a pool
    assert below.loader.pools is not None
    below.close()
    loop = load_lazy_model(
        client,
        "mixtral-float32",
        budget_bytes=total - 1,
        experts_implementation="eager",
    )
    assert loop.loader.pools is None  # the eager loop on cached experts
    loop.close()


def test_a_switch_in_slots_needs_every_new_expert_cached_first(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    tag = "qwen3_moe-float32"
    store = Store(tmp_path / "s")
    import_checkpoint(store, checkpoints[tag].path, tag)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            lm = load_lazy_model(c, tag, budget_bytes=expert_sizes(c, tag)[0])
            m = c.get_manifest(tag)
            key = "layers.1.experts.2"
            t = c.fetch_shards(tag, [key], manifest=m)[key]
            v2 = c.commit(tag, m.version, {key: {n: x * 2 for n, x in t.items()}})
            assert lm.loader.missing_slots(v2.manifest) == [(1, 2)]
            lm.loader.warm(v2.manifest, [(1, 2)], evict=False)
            assert lm.loader.missing_slots(v2.manifest) == []
            before = lm.model(PROMPT).logits
            lm.loader.switch(v2.manifest)  # as the swapper's flip does
            assert not torch.equal(before, lm.model(PROMPT).logits)
            lm.close()
    finally:
        srv.stop(0)


@pytest.mark.parametrize("tag", ["mixtral-bfloat16", "qwen3_moe-float32"])
@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_a_smaller_budget_runs_the_stock_implementation_on_the_pool(
    client: ParamClient,
    checkpoints: dict[str, Checkpoint],
    tag: str,
    implementation: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half the experts fit: they live in a pool of slots shared by the
    layers, the routed ids are replaced by slots, and transformers' own
    implementation runs on the pool: the resident model's logits, bit for
    bit, while experts are evicted and brought in between layers."""
    import loaders.models

    def no_loop(*args: object) -> None:
        raise AssertionError("the eager loop ran instead of the pool")

    lm = lazy(client, tag, 0.5, implementation)
    try:
        assert (
            lm.loader.pools is not None and lm.experts_implementation == implementation
        )
        ref = eager(checkpoints[tag].path, implementation)
        monkeypatch.setattr(loaders.models, "lazy_experts_forward", no_loop)
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(ref(PROMPT).logits, lm.model(PROMPT).logits)
        st = lm.loader.stats()
        assert st.evictions > 0 and st.peak_resident_bytes <= lm.loader.budget_bytes
    finally:
        lm.close()


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_next_layers_experts_are_prefetched_while_a_layer_computes(
    client: ParamClient, checkpoints: dict[str, Checkpoint], prefetch: bool
) -> None:
    """Decoding one sequence routes 2 of a layer's 4 experts; the pool holds 4
    of the 8 experts. Each layer's input, through the next layer's router,
    names the next layer's experts, and they are brought in while the layer
    computes: forward passes then find them resident. Generation is the
    resident model's, token for token, with the prefetch on or off."""
    tag = "qwen3_moe-bfloat16"
    total, _ = expert_sizes(client, tag)
    lm = load_lazy_model(
        client,
        tag,
        budget_bytes=total // 2,
        experts_implementation="grouped_mm",
        prefetch=prefetch,
    )
    try:
        ref = eager(checkpoints[tag].path, "grouped_mm")
        args = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            want = ref.generate(PROMPT[:1, :4], **args)
            got = lm.model.generate(PROMPT[:1, :4], **args)
        assert torch.equal(want, got)
        lm.loader.settle()
        st = lm.loader.stats()
        assert st.peak_resident_bytes <= lm.loader.budget_bytes
        if prefetch:
            assert st.prefetched > 0 and st.routed_after_prediction > 0
            assert 0 < st.prediction_recall <= 1 and 0 < st.prediction_precision <= 1
        else:
            assert st.prefetched == 0 and st.predicted == 0
    finally:
        lm.close()


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]
)
def test_steps_launched_on_the_map_ahead_of_the_lookup_equal_the_resident_model(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], model_type: str
) -> None:
    """As on CUDA, each layer step is launched on the device map before the
    host knows its experts, then kept (all mapped) or run again (forced on
    here: on the CPU it is off by default). Half the experts fit: decoding
    keeps some steps and redoes others, and the tokens and logits are the
    resident model's in every family, at a quarter of the experts too."""
    path = _family_checkpoint(tmp_path, checkpoints, model_type)
    import_checkpoint(Store(tmp_path / "s"), path, model_type)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    args = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            ref = eager(path, "grouped_mm")
            with torch.no_grad():
                want_tokens = ref.generate(PROMPT[:1, :4], **args)
                want_logits = ref(PROMPT).logits
            for fraction in (0.5, 0.25):
                lm = lazy(c, model_type, fraction, "grouped_mm", prefetch=False)
                try:
                    assert lm.loader.pools is not None
                    assert not lm.loader.launch_ahead  # the CPU default
                    lm.loader.launch_ahead = True
                    with torch.no_grad():
                        got = lm.model.generate(PROMPT[:1, :4], **args)
                        assert torch.equal(want_tokens, got), fraction
                        assert torch.equal(want_logits, lm.model(PROMPT).logits)
                    st = lm.loader.stats()
                    assert st.peak_resident_bytes <= lm.loader.budget_bytes
                    if fraction == 0.5:
                        assert st.steps_on_map > 0 and st.steps_redone > 0
                finally:
                    lm.close()
    finally:
        srv.stop(0)


def test_generate_decodes_pooled_layers_with_the_kernel_a_resident_model_gets(
    client: ParamClient,
) -> None:
    """transformers' generate decodes with batched_mm instead of grouped_mm
    on a GPU (by renaming the model's implementation); a pooled model's
    layers follow it there, and nowhere else."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from loaders.models import _follow_the_decode_switch

    grouped = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    batched = ALL_EXPERTS_FUNCTIONS["batched_mm"]
    lm = lazy(client, "qwen3_moe-float32", 0.5, "grouped_mm")
    try:
        layers = [m for m in lm.model.modules() if "_lazy_inner" in m.__dict__]
        assert len(layers) == 2
        with lm.model._optimize_model_for_decode():
            assert all(m._lazy_inner is grouped for m in layers)  # on the CPU
        _follow_the_decode_switch(lm.model, layers, torch.device("cuda"))
        with lm.model._optimize_model_for_decode():
            assert all(m._lazy_inner is batched for m in layers)  # as on a GPU
        assert all(m._lazy_inner is grouped for m in layers)
    finally:
        lm.close()


def _two_slot_loader(client: ParamClient, *, per_layer: bool):  # type: ignore[no-untyped-def]
    """A loader of qwen3_moe-float32 whose pool holds two experts (layer 0's
    own pool when `per_layer`, else one shared by the layers), and the
    manifest, key and tensors of layer 0's expert 1."""
    from loaders.pool import ExpertPool

    tag = "qwen3_moe-float32"
    m = client.get_manifest(tag)
    key = "layers.0.experts.1"
    t = client.fetch_shards(tag, [key], manifest=m)[key]
    shapes = {n: tuple(x.shape) for n, x in by_expert_suffix(t).items()}
    pool = ExpertPool(shapes, 2, dtype=torch.float32, device="cpu")

    def prepare(layer: int, e: int, ts: dict[str, torch.Tensor], pin: bool):  # type: ignore[no-untyped-def]
        return {n: x.clone() for n, x in by_expert_suffix(ts).items()}

    loader = LazyExpertLoader(
        client,
        m,
        budget_bytes=2 * expert_sizes(client, tag)[1],
        pool={0: pool} if per_layer else pool,
        prepare=prepare,
    )
    return loader, pool, m, key, t


def test_the_device_map_holds_only_experts_still_in_their_slots(
    client: ParamClient,
) -> None:
    """An expert is mapped once its slot is written into the layer's device
    map, and unmapped when it leaves the slot (evicted, or a version switch);
    a step launched before an unmapping is told to run again."""
    loader, _, m, key, t = _two_slot_loader(client, per_layer=True)
    try:
        with loader.hold_mapped(0, [0]) as hit:
            assert not hit  # nothing mapped yet
        with loader.acquire_slots(0, [0, 1]) as slots:
            assert slots is not None
            table = loader.map_slots(0, slots, 4)
        assert [int(table[e]) for e in (0, 1)] == [slots[0], slots[1]]
        hits = loader.stats().hits
        with loader.hold_mapped(0, [0, 1]) as hit:
            assert hit
        with loader.hold_mapped(0, [1, 2]) as hit:
            assert not hit  # expert 2 is not mapped: nothing held or counted
        st = loader.stats()
        assert st.hits == hits + 2 and st.steps_on_map == 1 and st.steps_redone == 0
        assert st.steps_looked_up == 2  # nothing mapped, then expert 2
        epoch = loader.map_epoch(0)
        with loader.acquire_slots(0, [2]):  # the pool is full: one leaves
            pass
        assert loader.map_epoch(0) > epoch
        with loader.hold_mapped(0, [0], epoch) as hit:
            assert not hit  # the map read at `epoch` may be stale
        assert loader.stats().steps_redone == 1
        assert loader.stats().steps_looked_up == 3
        epoch = loader.map_epoch(0)
        with loader.acquire_slots(0, [2]) as slots:
            assert slots is not None
            loader.map_slots(0, slots, 4)
        # mapping changes the map too: a step launched before read the old
        # entry of expert 2 (another thread's step may have mapped it)
        assert loader.map_epoch(0) > epoch
        with loader.hold_mapped(0, [2], epoch) as hit:
            assert not hit
        with loader.hold_mapped(0, [2], loader.map_epoch(0)) as hit:
            assert hit
        v2 = client.commit(m.model, m.version, {key: {n: x * 3 for n, x in t.items()}})
        loader.switch(v2.manifest)
        with loader.hold_mapped(0, [2]) as hit:
            assert not hit  # a switch unmaps every expert
    finally:
        loader.close()


def test_a_new_versions_experts_move_into_the_slots_the_switch_frees(
    client: ParamClient,
) -> None:
    """Replacements fetched beside a full pool (over the budget) move into the
    slots of the experts they replace when the version is switched to."""
    loader, pool, m, key, t = _two_slot_loader(client, per_layer=False)
    try:
        with loader.acquire_slots(0, [0, 1]) as slots:
            assert slots is not None and sorted(slots.values()) == [0, 1]
        v2 = client.commit(m.model, m.version, {key: {n: x * 3 for n, x in t.items()}})
        loader.warm(v2.manifest, [(0, 1)], evict=False)  # the pool is full
        assert pool.free == 0
        loader.switch(v2.manifest)
        with loader.acquire_slots(0, [0, 1]) as slots:
            assert slots is not None  # both in the pool again, no fetch
            views = pool.views(slots[1])
            want = by_expert_suffix(t)
            assert all(torch.equal(views[n], x * 3) for n, x in want.items())
        assert loader.stats().fetches == 2
    finally:
        loader.close()


def test_a_device_miss_is_served_from_the_host_tier_without_a_fetch(
    client: ParamClient,
) -> None:
    tag = "mixtral-float32"
    total, largest = expert_sizes(client, tag)
    loader = LazyExpertLoader.for_model(
        client, tag, budget_bytes=largest, host_budget_bytes=total
    )
    try:
        with loader.acquire(0, [0]) as first:
            want = {n: t.clone() for n, t in first[0].items()}
        with loader.acquire(0, [1]):
            pass  # evicts expert 0 from the device budget
        fetches = loader.stats().fetches
        with loader.acquire(0, [0]) as again:
            assert all(torch.equal(again[0][n], t) for n, t in want.items())
        st = loader.stats()
        assert st.fetches == fetches and st.host_hits == 1 and st.evictions == 2
        assert 0 < st.host_bytes <= total
    finally:
        loader.close()
    off = LazyExpertLoader.for_model(client, tag, budget_bytes=largest)
    try:
        assert off.host_budget_bytes == 0  # on the CPU the device is the host
        for e in (0, 1, 0):
            with off.acquire(0, [e]):
                pass
        assert off.stats().fetches == 3 and off.stats().host_hits == 0
    finally:
        off.close()
