"""Local training of an institution: gradient accumulation and where it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fed_clients.task import load_split, make_task, model_config
from fed_clients.train import TrainConfig, train_local


def _start(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor], torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    task = make_task(tmp_path / "task", ("a",), train_docs=16, test_docs=4)
    cfg = model_config(task, hidden=32)
    cfg["router_aux_loss_coef"] = 0.0  # the balancing loss is not additive
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(tmp_path / "ckpt")  # checkpoint naming, as received
    received = load_file(tmp_path / "ckpt" / "model.safetensors")
    data = load_split(task.data_path("a"), "train")
    return json.dumps(cfg), received, data


def test_accumulated_micro_batches_train_like_the_whole_batch(tmp_path: Path) -> None:
    config, received, data = _start(tmp_path)
    base = {"steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 5, "device": "cpu"}
    whole = train_local(config, received, data, TrainConfig(**base))
    parts = train_local(config, received, data, TrainConfig(**base, micro_batch_size=3))
    assert whole.train_loss == pytest.approx(parts.train_loss, rel=1e-5)
    changed = [k for k in received if not torch.equal(whole.tensors[k], received[k])]
    assert changed and all(".experts." in k for k in changed)
    for k in received:
        torch.testing.assert_close(
            parts.tensors[k], whole.tensors[k], atol=2e-6, rtol=0
        )
    assert whole.expert_tokens == parts.expert_tokens
    again = train_local(config, received, data, TrainConfig(**base, micro_batch_size=3))
    assert all(torch.equal(again.tensors[k], parts.tensors[k]) for k in received)
    with pytest.raises(ValueError, match="micro-batch size"):
        TrainConfig(micro_batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda_and_returns_cpu_tensors(tmp_path: Path) -> None:
    config, received, data = _start(tmp_path)
    out = train_local(config, received, data, TrainConfig(steps=2, batch_size=4))
    assert all(t.device.type == "cpu" for t in out.tensors.values())
    assert any(not torch.equal(out.tensors[k], received[k]) for k in received)


def test_bf16_mixed_precision_trains_and_auto_is_fp32_on_the_cpu(
    tmp_path: Path,
) -> None:
    config, received, data = _start(tmp_path)
    base = {"steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 2, "device": "cpu"}
    fp32 = train_local(config, received, data, TrainConfig(**base, precision="fp32"))
    auto = train_local(config, received, data, TrainConfig(**base))
    assert all(torch.equal(auto.tensors[k], fp32.tensors[k]) for k in received)
    bf16 = train_local(config, received, data, TrainConfig(**base, precision="bf16"))
    assert bf16.train_loss == pytest.approx(fp32.train_loss, rel=0.05)
    changed = [k for k in received if not torch.equal(bf16.tensors[k], fp32.tensors[k])]
    assert changed  # bf16 matmuls: another result, the weights still fp32
    assert all(bf16.tensors[k].dtype == received[k].dtype for k in received)
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bf16_model_trains_in_mixed_precision_on_cuda(tmp_path: Path) -> None:
    config, received, data = _start(tmp_path)
    received = {k: t.to(torch.bfloat16) for k, t in received.items()}
    cfg = TrainConfig(steps=2, batch_size=4, seed=2)
    auto = train_local(config, received, data, cfg)
    fp32 = train_local(
        config,
        received,
        data,
        TrainConfig(
            **{
                **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                "precision": "fp32",
            }
        ),
    )
    assert all(t.dtype == torch.bfloat16 for t in auto.tensors.values())
    assert any(not torch.equal(auto.tensors[k], fp32.tensors[k]) for k in received)
