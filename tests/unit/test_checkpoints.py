"""Hugging Face checkpoints in and out of the store, bit-exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from param_server.core.errors import InvalidInputError, SchemaMismatchError
from param_server.store import Store
from param_server.store.checkpoints import export_checkpoint, import_checkpoint
from tests.conftest import Checkpoint


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {
        n: t
        for f in sorted(path.glob("*.safetensors"))
        for n, t in load_file(f).items()
    }


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(48).remainder(128).view(2, 24)
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def load(path: Path) -> torch.nn.Module:
    """The eager model as transformers loads it (dtype from config.json)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "tag",
    ["mixtral-float32", "qwen3_moe-float32", "mixtral-bfloat16", "qwen3_moe-bfloat16"],
)
def test_import_export_round_trip(
    checkpoints: dict[str, Checkpoint], tmp_path: Path, tag: str
) -> None:
    ck = checkpoints[tag]
    assert (ck.path / "model.safetensors.index.json").exists()
    store = Store(tmp_path / "store")
    m = import_checkpoint(store, ck.path, "m").manifest
    experts = [k for k in m.shards if ".experts." in k]
    assert len(experts) == 2 * 4 and {
        "global",
        "layers.0.dense",
        "layers.1.dense",
    } <= set(m.shards)
    assert "config.json" in m.files
    out = export_checkpoint(store, "m", tmp_path / "out", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    src, dst = all_tensors(ck.path), all_tensors(out)
    assert src.keys() == dst.keys()
    for name in src:
        assert src[name].dtype == dst[name].dtype
        assert torch.equal(src[name].view(torch.uint8), dst[name].view(torch.uint8)), (
            name
        )
    assert torch.equal(logits(load(ck.path)), logits(load(out)))


def test_single_file_checkpoint(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    ck = checkpoints["qwen3_moe-float32"]
    src = tmp_path / "single"
    ck.model.save_pretrained(src)
    assert (src / "model.safetensors").exists()
    store = Store(tmp_path / "store")
    import_checkpoint(store, src, "q")
    out = export_checkpoint(store, "q", tmp_path / "out")
    assert (out / "model.safetensors").exists()
    assert torch.equal(logits(load(src)), logits(load(out)))


def test_fused_checkpoint_is_split_per_expert_and_restacked(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    """transformers 5 state dicts keep a layer's experts in [E, ...] tensors."""
    ck = checkpoints["qwen3_moe-bfloat16"]
    src = tmp_path / "fused"
    shutil.copytree(
        ck.path, src, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json")
    )
    state = {k: v.contiguous() for k, v in ck.model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    store = Store(tmp_path / "store")
    m = import_checkpoint(store, src, "f").manifest
    e3 = m.shards["layers.1.experts.3"]
    assert {t.name for t in e3.tensors} == {
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    }
    assert all(t.stacked for t in e3.tensors)
    assert e3.tensors[0].shape == tuple(state[e3.tensors[0].name].shape[1:])
    out = export_checkpoint(store, "f", tmp_path / "out")
    back = load_file(out / "model.safetensors")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert torch.equal(logits(load(ck.path)), logits(load(out)))


def test_reimport_of_one_changed_expert_writes_one_blob(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    ck = checkpoints["mixtral-float32"]
    store = Store(tmp_path / "store")
    import_checkpoint(store, ck.path, "m")
    src = tmp_path / "changed"
    shutil.copytree(ck.path, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    f = src / index["weight_map"][name]
    tensors = load_file(f)
    tensors[name] = tensors[name] + 1
    save_file(tensors, f, metadata={"format": "pt"})
    r = import_checkpoint(store, src, "m")
    assert r.manifest.changed == ("layers.1.experts.2",)
    assert r.blobs_written == 1


def test_schema_change_on_reimport_is_refused(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    import_checkpoint(store, checkpoints["mixtral-float32"].path, "m")
    with pytest.raises(
        SchemaMismatchError,
        match=r"tensor 'lm_head\.weight' is BF16 \[128, 32\] but the parent has F32",
    ):
        import_checkpoint(store, checkpoints["mixtral-bfloat16"].path, "m")
    assert store.head("m") == 1
    import_checkpoint(
        store, checkpoints["mixtral-bfloat16"].path, "m", allow_schema_change=True
    )
    assert store.head("m") == 2


@pytest.mark.parametrize(
    "damage", ["truncate", "garbage", "missing_shard", "no_config"]
)
def test_broken_checkpoints_are_refused_and_nothing_is_written(
    checkpoints: dict[str, Checkpoint], tmp_path: Path, damage: str
) -> None:
    src = tmp_path / "broken"
    shutil.copytree(checkpoints["mixtral-float32"].path, src)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
        match = r"outside the \d+-byte data section"
    elif damage == "garbage":
        victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
        match = "not UTF-8 JSON"
    elif damage == "missing_shard":
        victim.unlink()
        match = "does not exist"
    else:
        (src / "config.json").unlink()
        match = "no config.json"
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidInputError, match=match):
        import_checkpoint(store, src, "m")
    assert store.list_models() == []
    assert not any(store.blob_root.iterdir())


def test_export_refuses_non_empty_destination(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    import_checkpoint(store, checkpoints["mixtral-float32"].path, "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").touch()
    with pytest.raises(InvalidInputError, match="not empty"):
        export_checkpoint(store, "m", tmp_path / "busy")


def _copy(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mixtral-float32"].path, src)
    return src


@pytest.mark.parametrize("what", ["tokenizer.json", "model.safetensors.index.json"])
def test_links_out_of_the_folder_are_refused(
    checkpoints: dict[str, Checkpoint], tmp_path: Path, what: str
) -> None:
    src = _copy(checkpoints, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text('{"private": "not for the fleet"}')
    shard = next(src.glob("model-*.safetensors"))
    if what == "tokenizer.json":
        (src / what).symlink_to(secret)
        named = src / what
    else:  # a weight file
        outside = tmp_path / "outside.safetensors"
        shard.rename(outside)
        shard.symlink_to(outside)
        named = shard
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidInputError, match="symbolic link") as e:
        import_checkpoint(store, src, "m")
    assert str(named) in str(e.value) and "--follow-links" in str(e.value)
    assert store.list_models() == []
    # Links inside the folder are fine, and a trusting caller may follow any.
    r = import_checkpoint(store, src, "m", follow_links=True)
    assert r.manifest.version == 1


def test_a_link_inside_the_folder_is_fine(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    src = _copy(checkpoints, tmp_path)
    (src / "real.json").write_text("{}")
    (src / "tokenizer_config.json").symlink_to("real.json")
    m = import_checkpoint(Store(tmp_path / "store"), src, "m").manifest
    assert "tokenizer_config.json" in m.files


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("config.json", "{{{", "not valid JSON"),
        ("config.json", "[1, 2]", "must be a JSON object"),
        ("generation_config.json", '{"a": ', "not valid JSON"),
        ("tokenizer_config.json", "\xff\xfe", "not valid JSON|not UTF-8"),
    ],
)
def test_model_files_that_must_be_json_are_checked_on_import_and_commit(
    checkpoints: dict[str, Checkpoint],
    tmp_path: Path,
    name: str,
    text: str,
    why: str,
) -> None:
    src = _copy(checkpoints, tmp_path)
    (src / name).write_bytes(text.encode("latin-1"))
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidInputError, match=why) as e:
        import_checkpoint(store, src, "m")
    assert repr(name) in str(e.value)
    assert store.list_models() == []
    # The same check guards a commit of the file alone (what a client sends).
    (src / name).write_text("{}")
    import_checkpoint(store, src, "m")
    with store.staging() as s:
        s.add(name, text.encode("latin-1"), is_file=True)
        with pytest.raises(InvalidInputError, match=why):
            store.commit("m", 1, s)
    assert store.head("m") == 1


def test_a_checkpoint_without_recognised_experts_warns_or_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    src = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(src)
    store = Store(tmp_path / "store")
    with caplog.at_level("WARNING", logger="param_server.store.checkpoints"):
        r = import_checkpoint(store, src, "dense")
    assert set(r.manifest.shards) == {"global", "layers.0.dense", "layers.1.dense"}
    (warning,) = [rec.getMessage() for rec in caplog.records]
    assert "no expert tensors recognised" in warning
    assert "LlamaForCausalLM (llama)" in warning and "dense model" in warning
    assert "2 layer shard(s) as dense and a global shard" in warning
    with pytest.raises(InvalidInputError, match="no expert tensors recognised"):
        import_checkpoint(store, src, "dense2", require_experts=True)
    assert "dense2" not in store.list_models()


def test_an_moe_whose_naming_no_row_knows_is_named_as_such(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    src = tmp_path / "renamed"
    src.mkdir()
    shutil.copy(checkpoints["mixtral-float32"].path / "config.json", src)
    tensors = all_tensors(checkpoints["mixtral-float32"].path)
    save_file(
        {k.replace(".experts.", ".specialists."): v for k, v in tensors.items()},
        src / "model.safetensors",
    )
    with pytest.raises(InvalidInputError, match="declares 4 experts per layer"):
        import_checkpoint(Store(tmp_path / "s"), src, "m", require_experts=True)


def test_the_import_bar_reaches_100_percent_before_the_commit_is_logged(
    checkpoints: dict[str, Checkpoint],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    store_log = logging.getLogger("param_server.store")
    store_log.addHandler(handler)
    store_log.setLevel(logging.INFO)
    try:
        src = checkpoints["qwen3_moe-bfloat16"].path
        import_checkpoint(Store(tmp_path / "s"), src, "m", progress=True)
    finally:
        store_log.removeHandler(handler)
        store_log.setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    bar, _, after = err.rpartition("committed m@1")
    last = bar.split("\r")[-1]
    assert "100%" in last, last
    assert bar.endswith("\n"), "the log line landed inside the bar"
    assert after
