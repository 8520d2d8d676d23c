"""Shard keys, model families and wire keys: one table, one grammar."""

from __future__ import annotations

import pytest

from param_server.core.errors import InvalidInputError
from param_server.core.shards import (
    FAMILIES,
    by_expert_suffix,
    classify,
    is_expert_key,
    lazy_family,
    parse_expert_key,
    parse_wire_key,
    wire_key,
)


@pytest.mark.parametrize(
    ("name", "key", "fused"),
    [
        (
            "model.layers.3.block_sparse_moe.experts.7.w2.weight",
            "layers.3.experts.7",
            False,
        ),
        (
            "model.layers.0.mlp.experts.12.gate_proj.weight",
            "layers.0.experts.12",
            False,
        ),
        ("model.layers.1.mlp.experts.0.down_proj.weight", "layers.1.experts.0", False),
        ("model.layers.2.mlp.experts.gate_up_proj", "layers.2.experts.*", True),
        ("model.layers.2.mlp.experts.down_proj", "layers.2.experts.*", True),
        # Shared experts, routers, attention and norms are the layer's dense shard.
        ("model.layers.1.mlp.shared_expert.up_proj.weight", "layers.1.dense", False),
        ("model.layers.1.mlp.shared_experts.up_proj.weight", "layers.1.dense", False),
        ("model.layers.1.mlp.shared_expert_gate.weight", "layers.1.dense", False),
        ("model.layers.4.block_sparse_moe.gate.weight", "layers.4.dense", False),
        ("model.layers.4.self_attn.q_proj.weight", "layers.4.dense", False),
        (
            "model.layers.0.mlp.gate_proj.weight",
            "layers.0.dense",
            False,
        ),  # dense MLP layer
        ("model.embed_tokens.weight", "global", False),
        ("model.norm.weight", "global", False),
        ("lm_head.weight", "global", False),
    ],
)
def test_naming_table(name: str, key: str, fused: bool) -> None:
    assert classify(name) == (key, fused)


def test_table_covers_the_named_families() -> None:
    families = {t for row in FAMILIES for t in row.model_types}
    assert {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
    } <= families


def test_lazy_rows_are_the_tested_families_and_others_are_refused() -> None:
    assert lazy_family("mixtral") is FAMILIES[0]
    assert lazy_family("qwen3_moe").params == lazy_family("deepseek_v3").params
    with pytest.raises(InvalidInputError, match=r"no lazy-expert support.*'gpt2'"):
        lazy_family("gpt2")
    # deepseek_v2 and gpt_oss import and export, but are not loaded lazily
    for kind in ("deepseek_v2", "gpt_oss"):
        with pytest.raises(InvalidInputError, match=r"supported: .*'mixtral'"):
            lazy_family(kind)


def test_expert_keys() -> None:
    assert parse_expert_key("layers.3.experts.12") == (3, 12)
    assert is_expert_key("layers.3.experts.12")
    for key in ("layers.3.dense", "global", "layers.3.experts.*", "x.experts.1"):
        assert parse_expert_key(key) is None
        assert not is_expert_key(key)


def test_wire_keys_round_trip() -> None:
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert wire_key(name, 5) == f"{name}@5"
    assert parse_wire_key(wire_key(name, 5)) == (name, 5)
    assert parse_wire_key(wire_key(name)) == (name, None)
    assert parse_wire_key("a@b") == ("a@b", None)  # not an expert slice


def test_by_expert_suffix() -> None:
    named = {
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": 1,
        "model.layers.0.mlp.experts.gate_up_proj": 2,
        "other": 3,
    }
    assert by_expert_suffix(named) == {"w1.weight": 1, "gate_up_proj": 2, "other": 3}
