"""Checkpoints that arrive quantized: the dequantization maths against a hand
computation, and every bad input answered by its error."""

from __future__ import annotations

import pytest
import torch

from param_server.core import quant
from param_server.core.errors import InvalidInputError
from param_server.core.prequant import (
    Scheme,
    dequantize_shard,
    dequantize_weight,
    scheme_of,
)

FP8 = Scheme("fp8", "_scale_inv", (128, 128))
CT = Scheme("compressed-tensors", "_scale")


def _by_hand(q: torch.Tensor, scale_of: dict[tuple[int, int], float]) -> torch.Tensor:
    """Element by element: q[i, j] * (the scale of (i, j)), in float32."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = float(q[i, j].float()) * scale_of[(i, j)]
    return out


def test_fp8_blocks_with_an_edge_block_by_hand() -> None:
    """A 3 x 130 weight: two column blocks of 128, the second 2 wide; each
    element times its block's scale_inv, rounded once to bf16."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(3, 130, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.03125, 3.0]])
    want = _by_hand(
        q, {(i, j): [0.03125, 3.0][j // 128] for i in range(3) for j in range(130)}
    )
    got = dequantize_weight(q, scale, FP8, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


def test_fp8_agrees_with_the_variant_maths() -> None:
    """The checkpoint layout is the one our fp8 variants use."""
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    qz = quant.quantize(w, "fp8")
    got = dequantize_weight(qz.values, qz.scales, FP8, torch.float32)
    assert torch.equal(got, quant.dequantize(qz, torch.float32))


@pytest.mark.parametrize(
    ("scale", "scale_of"),
    [
        # per tensor
        (torch.tensor([0.5]), lambda i, j: 0.5),
        # per output channel, as [out, 1]
        (torch.tensor([[0.5], [2.0], [0.25]]), lambda i, j: [0.5, 2.0, 0.25][i]),
        # per group of 2 input columns
        (
            torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
            lambda i, j: [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]][i][j // 2],
        ),
    ],
)
def test_compressed_tensors_int8_scales_by_hand(scale, scale_of) -> None:  # type: ignore[no-untyped-def]
    q = torch.tensor(
        [[1, -2, 3, -127], [0, 5, -6, 7], [8, 9, -10, 127]], dtype=torch.int8
    )
    want = _by_hand(q, {(i, j): scale_of(i, j) for i in range(3) for j in range(4)})
    assert torch.equal(dequantize_weight(q, scale, CT, torch.float32), want)


def test_a_shard_loses_its_scales_and_keeps_the_rest() -> None:
    q = torch.ones(4, 4).to(torch.float8_e4m3fn)
    shard = {
        "m.experts.0.gate_proj.weight": q,
        "m.experts.0.gate_proj.weight_scale_inv": torch.tensor([[2.0]]),
        "m.experts.0.gate_proj.input_scale": torch.tensor([1.0]),
        "m.norm.weight": torch.ones(4, dtype=torch.bfloat16),
    }
    out = dequantize_shard(shard, FP8, torch.bfloat16)
    assert sorted(out) == ["m.experts.0.gate_proj.weight", "m.norm.weight"]
    assert torch.equal(
        out["m.experts.0.gate_proj.weight"], torch.full((4, 4), 2.0).bfloat16()
    )
    assert out["m.norm.weight"] is shard["m.norm.weight"]


def test_bad_quantized_shards_are_refused_by_name() -> None:
    q = torch.ones(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(
        InvalidInputError, match=r"up_proj.weight is .* no up_proj.weight_scale_inv"
    ):
        dequantize_shard({"up_proj.weight": q}, FP8, torch.bfloat16)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        dequantize_weight(q, torch.tensor([[float("nan")]]), FP8, torch.bfloat16)
    with pytest.raises(InvalidInputError, match=r"needs \[1, 1\]"):
        dequantize_weight(q, torch.ones(2, 2), FP8, torch.bfloat16)
    with pytest.raises(InvalidInputError, match="do not tile"):
        dequantize_weight(q.to(torch.int8), torch.ones(3, 1), CT, torch.float32)
    with pytest.raises(InvalidInputError, match="asymmetric"):
        dequantize_shard(
            {
                "a.weight": q.to(torch.int8),
                "a.weight_scale": torch.ones(4, 1),
                "a.weight_zero_point": torch.ones(4, 1, dtype=torch.int8),
            },
            CT,
            torch.float32,
        )
    with pytest.raises(InvalidInputError, match="packed"):
        dequantize_shard(
            {"a.weight_packed": torch.zeros(4, 1, dtype=torch.int32)}, CT, torch.float32
        )


def test_the_scheme_comes_from_config_json() -> None:
    assert scheme_of({"model_type": "qwen3_moe"}) is None
    fp8 = scheme_of(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64]}}
    )
    assert fp8 == Scheme("fp8", "_scale_inv", (128, 64))
    ct = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 8, "symmetric": True}}},
    }
    assert scheme_of({"quantization_config": ct}) == CT
    with pytest.raises(InvalidInputError, match="4-bit weights"):
        four = {"g": {"weights": {"num_bits": 4, "symmetric": True}}}
        scheme_of({"quantization_config": {**ct, "config_groups": four}})
    with pytest.raises(InvalidInputError, match="asymmetric"):
        asym = {"g": {"weights": {"num_bits": 8, "symmetric": False}}}
        scheme_of({"quantization_config": {**ct, "config_groups": asym}})
    with pytest.raises(InvalidInputError, match="pack-quantized"):
        scheme_of({"quantization_config": {**ct, "format": "pack-quantized"}})
    with pytest.raises(InvalidInputError, match="'gptq' cannot be served"):
        scheme_of({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(InvalidInputError, match="weight_block_size"):
        scheme_of(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [0]}}
        )


def test_an_8_bit_shard_has_no_variant() -> None:
    q = torch.ones(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(InvalidInputError, match="imported quantized"):
        quant.encode_variant({"w": q, "w_scale_inv": torch.ones(1, 1)}, "int8", "d")
