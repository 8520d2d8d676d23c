"""Expert-wise LoRA: the adapters' maths on the client, exact aggregation and
validation on the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common import MessageType
from safetensors.torch import load_file

from fed_clients.lora import Adapters, LoRAConfig
from fed_clients.train import TrainConfig, build_model, train_local
from param_server.core.errors import InvalidInputError
from param_server.federation import protocol, wire
from param_server.federation.aggregate import (
    ClientUpdate,
    Layout,
    UpdateRejectedError,
    WireTensor,
    parse_reply,
    sparse_average,
)
from param_server.federation.config import FederationConfig
from tests.integration.test_lazy import _table_family


def _checkpoint(tmp_path: Path, model_type: str) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny model of `model_type` as an institution receives it."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import _mixtral, _qwen3_moe

    torch.manual_seed(0)
    if model_type == "mixtral":
        model = _mixtral()
    elif model_type == "qwen3_moe":
        model = _qwen3_moe()
    else:
        model = AutoModelForCausalLM.from_config(_table_family(model_type))
    model.save_pretrained(tmp_path / model_type)
    received = load_file(tmp_path / model_type / "model.safetensors")
    config = (tmp_path / model_type / "config.json").read_text()
    return config, received


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]
)
def test_an_adapted_model_computes_what_its_merged_weights_compute(
    tmp_path: Path, model_type: str
) -> None:
    """W + scale * B @ A, written into the checkpoint tensors the adapters
    name and loaded by transformers as any checkpoint, gives the adapted
    model's logits: the update the server forms is what was trained."""
    config, received = _checkpoint(tmp_path, model_type)
    model = build_model(config, received).eval()
    lora = LoRAConfig(rank=3, alpha=6.0, targets="experts+attention")
    if model_type == "deepseek_v3":  # MLA attention: its own projection names
        lora = LoRAConfig(rank=3, alpha=6.0, targets=r"self_attn\.o_proj$")
    adapters = Adapters(model, received, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.arange(40).remainder(100).view(2, 20)
    with torch.no_grad():
        adapted = model(ids).logits
    trained = adapters.trained()
    experts = [k for k in trained if ".experts." in k]
    assert len(experts) == sum(".experts." in k for k in received)  # all B != 0
    assert any("self_attn" in k for k in trained)
    merged = dict(received)
    for key, (a, b) in trained.items():
        merged[key] = received[key] + lora.scale * (b @ a).reshape(received[key].shape)
    with torch.no_grad():
        fresh = build_model(config, merged).eval()(ids).logits
    torch.testing.assert_close(fresh, adapted, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(fresh, build_model(config, received).eval()(ids).logits)


def test_only_experts_that_learned_are_sent(tmp_path: Path) -> None:
    config, received = _checkpoint(tmp_path, "qwen3_moe")
    model = build_model(config, received)
    adapters = Adapters(model, received, LoRAConfig(rank=2, alpha=4.0))
    layer = adapters.experts[1]
    with torch.no_grad():
        layer.parts["down_proj"][0].b[2].fill_(0.5)  # expert 2 of layer 1
    assert sorted(adapters.trained()) == [
        "model.layers.1.mlp.experts.2.down_proj.weight"
    ]


def test_lora_training_sends_adapters_of_routed_experts_only(tmp_path: Path) -> None:
    """A round in LoRA mode: the base weights stay as received, every expert
    tokens reached has an adapter and no other does; with the router
    trainable it is trained in full and comes back whole."""
    from tests.unit.test_local_training import _start

    config, received, data = _start(tmp_path)
    lora = LoRAConfig(rank=4, alpha=8.0)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=3, device="cpu")
    out = train_local(config, received, data, cfg, lora=lora)
    assert all(torch.equal(out.tensors[k], received[k]) for k in received)
    layer_of = {
        f"model.layers.{layer}.block_sparse_moe.experts.{e}.": n
        for layer, counts in out.expert_tokens.items()
        for e, n in enumerate(counts)
    }
    sent = {k.rsplit(".", 2)[0] + "." for k in out.adapters}
    assert sent == {k for k, n in layer_of.items() if n > 0}
    for a, b in out.adapters.values():
        assert a.shape[0] == 4 and b.shape[1] == 4 and bool(b.ne(0).any())
    again = train_local(config, received, data, cfg, lora=lora)  # deterministic
    assert all(
        torch.equal(again.adapters[k][1], out.adapters[k][1]) for k in out.adapters
    )
    routed = train_local(
        config,
        received,
        data,
        TrainConfig(**{**_cfg(cfg), "trainable": "experts+router"}),
        lora=lora,
    )
    whole = [k for k in received if not torch.equal(routed.tensors[k], received[k])]
    assert whole and all(".gate." in k for k in whole)


def _cfg(cfg: TrainConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_lora_needs_the_sparse_strategy_and_a_sane_rank() -> None:
    with pytest.raises(InvalidInputError, match="sparse-fedavg only"):
        FederationConfig(model="m", strategy="fedavg", lora_rank=8)
    with pytest.raises(InvalidInputError, match="lora-rank"):
        FederationConfig(model="m", lora_rank=-1)
    with pytest.raises(ValueError, match="lora-rank"):
        LoRAConfig(rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="not a regex"):
        LoRAConfig(rank=2, alpha=1.0, targets="(")


# --- aggregation ------------------------------------------------------------------

SCALE = 2.0


def _layout() -> Layout:
    specs = [
        WireTensor("e0.w", "layers.0.experts.0", "e0.w", "BF16", (4, 6), (0, 0)),
        WireTensor("e1.w", "layers.0.experts.1", "e1.w", "BF16", (4, 6), (0, 1)),
        WireTensor("attn.w", "layers.0.dense", "attn.w", "BF16", (4, 6), None),
        WireTensor("norm", "layers.0.dense", "norm", "BF16", (6,), None),
    ]
    return Layout({s.key: s for s in specs})


def _current() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(s.shape, generator=g).to(torch.bfloat16)
        for k, s in _layout().specs.items()
    }


def _ab(seed: int, rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, 6, generator=g).to(torch.bfloat16)
    b = torch.randn(4, rank, generator=g).to(torch.bfloat16)
    return a, b


def _client(
    n: int, tokens: float, **adapters: tuple[torch.Tensor, torch.Tensor]
) -> ClientUpdate:
    return ClientUpdate(
        node_id=n,
        institution=f"inst-{n}",
        num_examples=n,
        tensors={},
        expert_tokens={(0, 0): tokens, (0, 1): tokens},
        adapters={k.replace("_", "."): v for k, v in adapters.items()},
    )


def test_lora_aggregate_is_the_weighted_mean_of_the_products_rounded_once() -> None:
    current = _current()
    # Three institutions adapted expert 0 (5, 1 and 2 tokens routed to it);
    # one adapted the attention tensor; nobody touched expert 1 or the norm.
    u1 = _client(1, 5.0, e0_w=_ab(1), attn_w=_ab(4))
    u2 = _client(2, 1.0, e0_w=_ab(2))
    u3 = _client(3, 2.0, e0_w=_ab(3))
    out = dict(sparse_average([u3, u1, u2], _layout(), current, SCALE))
    assert set(out) == {"e0.w", "attn.w"}
    # By hand: W + sum_i w_i * scale * B_i A_i / sum_i w_i, in float64,
    # rounded once to bf16.
    w = current["e0.w"].double()
    products = [SCALE * (b.double() @ a.double()) for a, b in (_ab(1), _ab(2), _ab(3))]
    want = w + (5 * products[0] + 1 * products[1] + 2 * products[2]) / 8
    assert out["e0.w"].dtype == torch.bfloat16
    assert torch.equal(out["e0.w"], want.to(torch.bfloat16))
    # One sender: the tensor plus its own update, weighted by examples.
    a, b = _ab(4)
    want_attn = current["attn.w"].double() + SCALE * (b.double() @ a.double())
    assert torch.equal(out["attn.w"], want_attn.to(torch.bfloat16))
    # Averaging A and B separately (the common federated-LoRA recipe) is not
    # the mean update.
    pairs = list(zip((5, 1, 2), (_ab(1), _ab(2), _ab(3)), strict=True))
    mean_a = sum(x * ab[0].double() for x, ab in pairs) / 8
    mean_b = sum(x * ab[1].double() for x, ab in pairs) / 8
    biased = (w + SCALE * (mean_b @ mean_a)).to(torch.bfloat16)
    assert not torch.equal(biased, out["e0.w"])
    assert (biased.double() - want).abs().max() > 0.1


def test_whole_and_adapted_updates_of_one_tensor_average_as_updates() -> None:
    current = _current()
    whole = current["e1.w"].double() + 1.0
    u1 = _client(1, 1.0, e1_w=_ab(5))
    u2 = ClientUpdate(2, "inst-2", 2, {"e1.w": whole.to(torch.bfloat16)}, {(0, 1): 3.0})
    out = dict(sparse_average([u1, u2], _layout(), current, SCALE))
    a, b = _ab(5)
    mine = current["e1.w"].double() + SCALE * (b.double() @ a.double())
    want = (1 * mine + 3 * whole.to(torch.bfloat16).double()) / 4
    assert torch.equal(out["e1.w"], want.to(torch.bfloat16))


# --- validation -------------------------------------------------------------------


def _reply(arrays: dict[str, torch.Tensor]) -> object:
    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = wire.to_array(v)
    content = RecordDict(
        {
            protocol.ARRAYS: rec,
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 4}),
            protocol.CLIENT: ConfigRecord({protocol.INSTITUTION: "lab"}),
        }
    )
    md = Metadata(7, "", 3, 1, "", "", 0.0, 60.0, MessageType.TRAIN)
    return make_message(md, content)


def _parse(arrays: dict[str, torch.Tensor], rank: int = 2) -> ClientUpdate:
    layout = _layout()
    return parse_reply(
        _reply(arrays),  # type: ignore[arg-type]
        layout,
        _current(),
        sent_dtypes={k: s.dtype for k, s in layout.specs.items()},
        lora_rank=rank,
        lora_scale=SCALE,
    )


def test_a_lora_reply_parses_into_adapters_with_its_bytes() -> None:
    a, b = _ab(1)
    u = _parse({"e0.w::lora_A": a, "e0.w::lora_B": b})
    assert set(u.adapters) == {"e0.w"} and not u.tensors
    assert torch.equal(u.adapters["e0.w"][0], a)
    assert u.bytes_received == (a.numel() + b.numel()) * 2


@pytest.mark.parametrize(
    ("arrays", "rank", "reason"),
    [
        ({"e0.w::lora_A": _ab(1)[0]}, 2, "lora_B missing"),
        ({"e0.w::lora_B": _ab(1)[1]}, 2, "lora_A missing"),
        (
            {"e0.w::lora_A": _ab(1)[0], "e0.w::lora_B": _ab(1)[1]},
            3,
            r"expected \[3, 6\]",
        ),
        (
            {"e0.w::lora_A": _ab(1)[0].float(), "e0.w::lora_B": _ab(1)[1]},
            2,
            "dtype F32 but the model's is BF16",
        ),
        (
            {
                "e0.w::lora_A": _ab(1)[0],
                "e0.w::lora_B": torch.full((4, 2), float("nan"), dtype=torch.bfloat16),
            },
            2,
            "NaN/Inf",
        ),
        (
            {"norm::lora_A": _ab(1)[0], "norm::lora_B": _ab(1)[1]},
            2,
            "not a matrix",
        ),
        (
            {"e9.w::lora_A": _ab(1)[0], "e9.w::lora_B": _ab(1)[1]},
            2,
            "unknown tensor name",
        ),
        (
            {
                "e0.w": _current()["e0.w"],
                "e0.w::lora_A": _ab(1)[0],
                "e0.w::lora_B": _ab(1)[1],
            },
            2,
            "both whole and as adapters",
        ),
        ({"e0.w::lora_A": _ab(1)[0], "e0.w::lora_B": _ab(1)[1]}, 0, "asked for whole"),
    ],
)
def test_bad_adapters_are_rejected_with_the_reason(
    arrays: dict[str, torch.Tensor], rank: int, reason: str
) -> None:
    with pytest.raises(UpdateRejectedError, match=reason):
        _parse(arrays, rank)


def test_the_round_config_asks_for_lora() -> None:
    c = FederationConfig.from_run_config(
        {"model": "m", "lora-rank": 8, "lora-alpha": 16.0, "lora-targets": "experts"}
    )
    assert c.lora_rank == 8 and c.lora_scale == 2.0
    assert json.dumps(c.to_run_config())  # what the demo and deployments write
