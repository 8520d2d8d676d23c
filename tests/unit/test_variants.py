"""Quantized variants of stored shards: made once, verified, collected with
their source."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from param_server.core import quant, tensor_codec
from param_server.core.errors import InvalidInputError, NotFoundError
from param_server.store import Store


def _expert(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1.weight": (torch.randn(256, 128, generator=g) * 0.02).to(dtype),
        "w2.weight": (torch.randn(128, 256, generator=g) * 0.02).to(dtype),
        "norm.bias": torch.randn(128, generator=g).to(dtype),  # a vector: kept
    }


def _commit(
    store: Store,
    parent: int,
    shards: dict[str, dict[str, torch.Tensor]],
    model: str = "m",
) -> int:
    with store.staging() as st:
        for key, tensors in shards.items():
            st.add(key, tensor_codec.encode(tensors))
        return store.commit(model, parent, st).manifest.version


@pytest.mark.parametrize("kind", [quant.INT8, quant.FP8])
def test_a_variant_is_made_once_and_decodes_to_its_source(
    tmp_path: Path, kind: str
) -> None:
    store = Store(tmp_path / "s")
    v = _commit(store, 0, {"layers.0.experts.0": _expert(0)})
    source = store.get_manifest("m", v).shards["layers.0.experts.0"]
    digest, size = store.variant(source.digest, kind)
    path = store.blob_path(digest)
    assert size == path.stat().st_size and size <= 0.53 * source.size
    made = path.stat().st_mtime_ns
    # Asked again, after a restart: the recorded blob, not a new one.
    assert Store(tmp_path / "s").variant(source.digest, kind) == (digest, size)
    assert path.stat().st_mtime_ns == made
    data = path.read_bytes()
    assert quant.variant_info(data)["source"] == source.digest
    back = quant.decode_variant(data)
    want = _expert(0)
    assert torch.equal(back["norm.bias"], want["norm.bias"])
    for name in ("w1.weight", "w2.weight"):
        assert (
            back[name].dtype == torch.bfloat16 and back[name].shape == want[name].shape
        )
        err = (back[name].float() - want[name].float()).abs().max()
        assert float(err) <= float(want[name].float().abs().max()) * 0.07
    # The same expert bytes elsewhere share the variant (content-addressed).
    v2 = _commit(store, 0, {"layers.3.experts.1": _expert(0)}, model="other")
    same = store.get_manifest("other", v2).shards["layers.3.experts.1"].digest
    assert same == source.digest and store.variant(same, kind) == (digest, size)


def test_a_corrupt_or_missing_variant_is_made_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    v = _commit(store, 0, {"layers.0.experts.0": _expert(1)})
    src = store.get_manifest("m", v).shards["layers.0.experts.0"].digest
    digest, _ = store.variant(src, quant.FP8)
    path = store.blob_path(digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(raw))
    fresh = Store(tmp_path / "s")  # a new process: nothing verified yet
    assert fresh.variant(src, quant.FP8)[0] == digest  # the same bytes again
    fresh.verify_blob(digest)
    path.unlink()
    assert fresh.variant(src, quant.FP8)[0] == digest and path.exists()


def test_gc_collects_a_variant_with_its_source(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    v1 = _commit(store, 0, {"layers.0.experts.0": _expert(2)})
    old = store.get_manifest("m", v1).shards["layers.0.experts.0"].digest
    old_variant, _ = store.variant(old, quant.INT8)
    v2 = _commit(store, v1, {"layers.0.experts.0": _expert(3)})
    new = store.get_manifest("m", v2).shards["layers.0.experts.0"].digest
    new_variant, _ = store.variant(new, quant.INT8)
    store.gc(keep_last=2)  # both versions kept: both variants stay
    assert store.blob_path(old_variant).exists()
    dry = store.gc(keep_last=1, dry_run=True)
    assert store.blob_path(old_variant).exists() and dry.blobs_deleted == 2
    store.gc(keep_last=1)
    assert not store.blob_path(old).exists()
    assert not store.blob_path(old_variant).exists()
    assert store.blob_path(new_variant).exists()
    assert not (tmp_path / "s" / "variants" / "int8" / old).exists()
    assert store.variant(new, quant.INT8)[0] == new_variant


def test_bad_variant_requests_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    bad = _expert(4, torch.float32)
    bad["w1.weight"][0, 0] = math.nan
    v = _commit(store, 0, {"layers.0.experts.0": bad})
    src = store.get_manifest("m", v).shards["layers.0.experts.0"].digest
    with pytest.raises(InvalidInputError, match="NaN/Inf"):
        store.variant(src, quant.INT8)
    with pytest.raises(InvalidInputError, match="unknown width 'int4'"):
        store.variant(src, "int4")
    with pytest.raises(InvalidInputError, match="stored width has no variant"):
        store.variant(src, "full")
    with pytest.raises(NotFoundError, match="missing"):
        store.variant("0" * 64, quant.FP8)
    with pytest.raises(InvalidInputError, match="not a quantized variant"):
        quant.decode_variant(tensor_codec.encode(_expert(5)))


def test_concurrent_requests_for_one_variant_make_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet asking for the variant of a new expert at once: one request
    makes it, the others wait for it and get the same blob."""
    import threading

    store = Store(tmp_path / "s")
    v = _commit(store, 0, {"layers.0.experts.0": _expert(0)})
    source = store.get_manifest("m", v).shards["layers.0.experts.0"].digest
    made = []
    encode = quant.encode_variant

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(quant, "encode_variant", counted)
    start = threading.Barrier(8)
    got: list[tuple[str, int]] = []

    def ask() -> None:
        start.wait()
        got.append(store.variant(source, quant.INT8))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert made == [1]
