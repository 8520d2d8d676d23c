"""Checkpoints that arrive quantized (DeepSeek-V3's FP8 block scales,
compressed-tensors int8): imported and exported bit for bit, served by a
live node that dequantizes them as transformers does."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loaders.models import load_lazy_model
from param_server.client import ParamClient
from param_server.core import quant
from param_server.core.errors import InvalidInputError
from param_server.core.shards import is_expert_key
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import export_checkpoint, import_checkpoint
from tests.conftest import Checkpoint

pytestmark = pytest.mark.integration
PROMPT = torch.arange(3, 3 + 2 * 24).remainder(128).view(2, 24)
# What DeepSeek-V3 quantizes: every projection; not the router, the
# embeddings or the head.
QUANTIZED = re.compile(r".*_proj\.weight|.*kv_a_proj_with_mqa\.weight")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write(path: Path, src: Path, tensors: dict[str, torch.Tensor], qc: dict) -> Path:  # type: ignore[type-arg]
    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return path


def fp8_checkpoint(src: Path, dest: Path) -> Path:
    """`src` as DeepSeek-V3 ships: float8_e4m3fn projections beside float32
    `weight_scale_inv` per 128 x 128 block."""
    out: dict[str, torch.Tensor] = {}
    for name, t in _tensors(src).items():
        if QUANTIZED.fullmatch(name):
            qz = quant.quantize(t, "fp8", name)
            out[name], out[name + "_scale_inv"] = qz.values, qz.scales
        else:
            out[name] = t
    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    return _write(dest, src, out, qc)


def int8_checkpoint(src: Path, dest: Path) -> Path:
    """`src` as compressed-tensors int-quantized ships: int8 projections
    beside a bf16 `weight_scale` per output channel ([out, 1])."""
    out: dict[str, torch.Tensor] = {}
    for name, t in _tensors(src).items():
        if QUANTIZED.fullmatch(name):
            qz = quant.quantize(t, "int8", name)
            out[name] = qz.values
            out[name + "_scale"] = qz.scales[:, None].to(torch.bfloat16)
        else:
            out[name] = t
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                },
            }
        },
        "ignore": ["lm_head"],
    }
    return _write(dest, src, out, qc)


def _deepseek(tmp_path: Path) -> Path:
    from tests.integration.test_lazy import _table_family

    torch.manual_seed(0)
    path = tmp_path / "deepseek"
    AutoModelForCausalLM.from_config(
        _table_family("deepseek_v3"), dtype=torch.bfloat16
    ).save_pretrained(path)
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    try:
        yield tmp_path / "s", f"127.0.0.1:{port}"
    finally:
        srv.stop(0).wait()


@pytest.mark.parametrize("layout", ["fp8", "int8"])
def test_a_quantized_checkpoint_is_imported_and_exported_bit_for_bit(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], layout: str
) -> None:
    src = checkpoints["qwen3_moe-bfloat16"].path
    make = fp8_checkpoint if layout == "fp8" else int8_checkpoint
    ckpt = make(src, tmp_path / layout)
    store = Store(tmp_path / "s")
    manifest = import_checkpoint(store, ckpt, "q").manifest
    suffix = "_scale_inv" if layout == "fp8" else "_scale"
    shard = manifest.shards["layers.1.experts.2"]  # its weights and their scales
    assert sorted(t.name.rsplit(".", 1)[-1] for t in shard.tensors) == sorted(
        ["weight", "weight" + suffix] * 3
    )
    dense = {t.name for t in manifest.shards["layers.1.dense"].tensors}
    assert not any(".experts." in n for n in dense)
    out = export_checkpoint(store, "q", tmp_path / "out")
    want, got = _tensors(ckpt), _tensors(out)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ckpt / "config.json").read_text()
    )


def _resident(path: Path, **kwargs: object) -> torch.nn.Module:
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="grouped_mm", **kwargs
    )
    with torch.no_grad():  # own memory, as after .to("cuda") (see test_lazy)
        for p in m.parameters():
            p.data = p.data.clone()
    return m.eval()  # type: ignore[no-any-return]


def _serve_equals(
    target: str, model: str, reference: torch.nn.Module, expert_bytes: int
) -> None:
    with ParamClient(target) as c:
        for budget in (expert_bytes, expert_bytes // 2):
            lm = load_lazy_model(c, model, budget_bytes=budget)
            try:
                assert lm.scheme is not None
                with torch.no_grad():
                    for prompt in (PROMPT, PROMPT[:1, :1]):
                        assert torch.equal(
                            reference(prompt).logits, lm.model(prompt).logits
                        ), budget
                    gen = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
                    assert torch.equal(
                        reference.generate(PROMPT[:1, :4], **gen),
                        lm.model.generate(PROMPT[:1, :4], **gen),
                    )
            finally:
                lm.close()


def _expert_bytes(target: str, model: str) -> int:
    with ParamClient(target) as c:
        shards = c.get_manifest(model).shards
    return sum(s.size for k, s in shards.items() if is_expert_key(k))


def test_a_node_serves_an_fp8_checkpoint_as_transformers_dequantizes_it(
    tmp_path: Path, served: tuple[Path, str]
) -> None:
    """DeepSeek-V3 (MLA attention, a dense first layer, a shared expert) in
    FP8 with block scales; the reference is transformers' own loader with
    `FineGrainedFP8Config(dequantize=True)`."""
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    from transformers import FineGrainedFP8Config

    ckpt = fp8_checkpoint(_deepseek(tmp_path), tmp_path / "fp8")
    store, target = served
    import_checkpoint(Store(store), ckpt, "ds-fp8")
    ref = _resident(ckpt, quantization_config=FineGrainedFP8Config(dequantize=True))
    _serve_equals(target, "ds-fp8", ref, _expert_bytes(target, "ds-fp8"))


def test_a_node_serves_an_int8_compressed_tensors_checkpoint(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], served: tuple[Path, str]
) -> None:
    """The reference is the same weights dequantized by hand (int8 times its
    row's scale, in float32, rounded once to bf16) and loaded resident."""
    ckpt = int8_checkpoint(checkpoints["qwen3_moe-bfloat16"].path, tmp_path / "int8")
    tensors = _tensors(ckpt)
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_scale"):
            continue
        scale = tensors.get(name + "_scale")
        plain[name] = t if scale is None else (t.float() * scale.float()).bfloat16()
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    save_file(plain, by_hand / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (by_hand / "config.json").write_text(json.dumps(config))
    store, target = served
    import_checkpoint(Store(store), ckpt, "q-int8")
    _serve_equals(target, "q-int8", _resident(by_hand), _expert_bytes(target, "q-int8"))


def _imported(  # type: ignore[no-untyped-def]
    make, checkpoints: dict[str, Checkpoint], tmp_path: Path, served, model: str
) -> str:
    """The tiny Qwen3-MoE made quantized by `make`, imported as `model`; the
    server's target."""
    ckpt = make(checkpoints["qwen3_moe-bfloat16"].path, tmp_path / model)
    store, target = served
    import_checkpoint(Store(store), ckpt, model)
    return str(target)


def test_a_quantized_checkpoint_has_no_8_bit_variant(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], served: tuple[Path, str]
) -> None:
    target = _imported(fp8_checkpoint, checkpoints, tmp_path, served, "q-fp8")
    with ParamClient(target) as c:
        m = c.get_manifest("q-fp8")
        with pytest.raises(InvalidInputError, match="imported quantized"):
            c.variants(m, ["layers.0.experts.1"], "int8")
        with pytest.raises(InvalidInputError, match="stored quantized"):
            load_lazy_model(c, "q-fp8", budget_bytes=10**9, width="fp8")


def test_a_quantized_checkpoint_is_not_federated(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], served: tuple[Path, str]
) -> None:
    from param_server.federation.server import load_state

    target = _imported(int8_checkpoint, checkpoints, tmp_path, served, "q-int8")
    with (
        ParamClient(target) as c,
        pytest.raises(InvalidInputError, match="imported quantized"),
    ):
        load_state(c, "q-int8", dense=False)
