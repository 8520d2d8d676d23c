"""The 8-bit variants' maths against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from param_server.core.errors import InvalidInputError
from param_server.core.quant import (
    FP8,
    INT8,
    check_width,
    dequantize,
    quantize,
)


def test_int8_per_row_scales_and_round_half_to_even() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    qz = quantize(w, INT8)
    # Row 0: scale 2/127; 1/scale = 63.5 -> 64 (to even), 0.5/scale = 31.75 -> 32.
    assert qz.scales.tolist() == pytest.approx([2 / 127, 1.0])
    assert qz.values.dtype == torch.int8
    assert qz.values.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]
    back = dequantize(qz)
    assert back[0].tolist() == pytest.approx([64 * 2 / 127, -2.0, 32 * 2 / 127, 0.0])
    assert back[1].tolist() == [0.0] * 4
    assert qz.nbytes == 8 + 2 * 4


def test_fp8_block_scales_edge_blocks_and_rounding() -> None:
    w = torch.zeros(130, 5)
    w[0, 0] = 4.48  # the block's max: 448 after scaling, E4M3's largest value
    w[3, 2] = 1.0  # 100 after scaling: halfway between 96 and 104 -> 96 (even)
    w[1, 1] = -0.01  # -1: exact
    qz = quantize(w, FP8)
    assert qz.values.dtype == torch.float8_e4m3fn and qz.values.shape == (130, 5)
    assert qz.scales.shape == (2, 1)  # 130 rows: a full block and a 2-row one
    assert qz.scales[0, 0].item() == pytest.approx(4.48 / 448)
    assert qz.scales[1, 0].item() == 1.0  # a block of zeros
    q = qz.values.float()
    assert q[0, 0].item() == 448.0 and q[3, 2].item() == 96.0
    assert q[1, 1].item() == pytest.approx(-1.0)
    back = dequantize(qz)
    assert back[3, 2].item() == pytest.approx(0.96)
    assert back[0, 0].item() == pytest.approx(4.48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_errors_stay_within_half_a_step(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * 0.02).to(dtype)
    q8 = quantize(w, INT8)
    err = (dequantize(q8, torch.float32) - w.float()).abs()
    # Ties (common with bf16 inputs) sit at exactly half a step.
    assert bool((err <= q8.scales[:, None] / 2 * (1 + 1e-5)).all())
    f8 = quantize(w, FP8)
    back = dequantize(f8)
    assert back.dtype == dtype and back.shape == w.shape
    big = w.float().abs() > 1e-3  # normal range of E4M3 after scaling
    rel = ((back.float() - w.float()).abs() / w.float().abs())[big]
    assert float(rel.max()) <= 2**-4 + 2**-7  # 3 mantissa bits (+ bf16 output)
    assert q8.nbytes < w.numel() * w.element_size() * 0.52 or dtype == torch.float32
    assert f8.nbytes < w.numel() * 2 * 0.52


def test_a_slice_of_a_fused_tensor_keeps_its_shape() -> None:
    w = torch.randn(1, 6, 4)
    for kind in (INT8, FP8):
        assert dequantize(quantize(w, kind)).shape == (1, 6, 4)


@pytest.mark.parametrize(
    ("w", "kind", "reason"),
    [
        (torch.tensor([[1.0, math.nan]]), INT8, "NaN/Inf"),
        (torch.tensor([[1.0, math.inf]]), FP8, "NaN/Inf"),
        (torch.ones(3), INT8, "not a matrix"),
        (torch.ones(2, 2, 2), FP8, "not a matrix"),
        (torch.ones(2, 2, dtype=torch.int32), INT8, "not a float"),
        (torch.ones(2, 2), "int4", "unknown quantization"),
    ],
)
def test_bad_weights_are_refused(w: torch.Tensor, kind: str, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        quantize(w, kind)


def test_widths() -> None:
    assert check_width("fp8") == "fp8"
    with pytest.raises(InvalidInputError, match="unknown width 'fp4'"):
        check_width("fp4")


def test_fp8_whole_blocks_take_the_fast_path_with_the_same_result() -> None:
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(3))
    qz = quantize(w, FP8)
    per_element = qz.scales.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(dequantize(qz), qz.values.float() * per_element)


def test_the_daemon_and_the_store_import_without_torch() -> None:
    """The daemon starts (and a crashed one restarts) without torch's import
    time: only making a variant needs it."""
    import subprocess
    import sys

    code = (
        "import sys, param_server.server.service, param_server.store, "
        "param_server.cli.serve; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
