"""Hugging Face checkpoint folders in and out of the store.

Tensor names map to shard keys through the rows of FAMILIES in
param_server.core.shards, which also says what the shard keys are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from param_server.core import tensor_codec
from param_server.core.errors import InvalidInputError, NotFoundError
from param_server.core.manifest import Manifest
from param_server.core.names import check_file_name
from param_server.core.results import CommitResult
from param_server.core.safetensors_format import read_header
from param_server.core.shards import (
    GLOBAL_KEY,
    classify,
    expert_key,
    parse_expert_key,
)
from param_server.store import Store, check_model_file

logger = logging.getLogger(__name__)

MAX_MODEL_FILE_BYTES = 64 * 1024 * 1024
_WEIGHT_INDEX = "model.safetensors.index.json"


# --- import ---------------------------------------------------------------------


def _own_file(src: Path, path: Path, follow_links: bool) -> Path:
    """`path`, refused when it is a symbolic link that leads out of `src`.

    A checkpoint folder from elsewhere could otherwise carry
    `tokenizer.json -> /etc/shadow` into the store, to every reader and into
    every export. Links that stay inside the folder are fine.
    """
    if follow_links or not path.is_symlink():
        return path
    real = path.resolve()
    if not real.is_relative_to(src.resolve()):
        raise InvalidInputError(
            f"refusing {path}: it is a symbolic link to {os.readlink(path)}, "
            f"outside the checkpoint folder {src}. Copy the real files in "
            "(cp -rL), or if you trust every link in the folder (a Hugging Face "
            "cache snapshot, say) import with --follow-links"
        )
    return path


def _weight_files(src: Path, follow_links: bool) -> dict[str, Path]:
    """tensor name -> file holding it, from the index or the single file."""
    index = src / _WEIGHT_INDEX
    single = src / "model.safetensors"
    if index.is_file():
        _own_file(src, index, follow_links)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidInputError(
                f"{index}: not a valid safetensors index ({e})"
            ) from e
        out = {}
        for name, fname in weight_map.items():
            check_file_name(fname)
            path = src / fname
            if not path.is_file():
                raise InvalidInputError(
                    f"{index} maps {name!r} to {fname!r}, which does not exist"
                )
            out[name] = _own_file(src, path, follow_links)
        return out
    if single.is_file():
        _own_file(src, single, follow_links)
        return {}
    raise InvalidInputError(
        f"{src} has neither model.safetensors nor {_WEIGHT_INDEX}; pass a folder "
        "written by save_pretrained(..., safe_serialization=True)"
    )


def _model_files(src: Path, follow_links: bool) -> list[Path]:
    """Small non-weight files that travel with the model (config.json, ...)."""
    out = []
    for p in sorted(src.iterdir()):
        if (
            not p.is_file()
            or p.name.endswith(".safetensors")
            or p.name == _WEIGHT_INDEX
            or p.name.startswith(".")
        ):
            continue
        _own_file(src, p, follow_links)
        if p.stat().st_size > MAX_MODEL_FILE_BYTES:
            logger.warning("skipping %s: larger than %d bytes", p, MAX_MODEL_FILE_BYTES)
            continue
        check_model_file(p.name, p)  # before any weight is read, not after
        out.append(p)
    return out


_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _no_experts(src: Path, plan: Mapping[str, list[str]]) -> str:
    """What to tell the user about a checkpoint in which no row of FAMILIES
    recognised a single expert tensor."""
    try:
        config = json.loads((src / "config.json").read_bytes())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
    kind = config.get("model_type", "unknown model_type")
    dense = sum(1 for k in plan if k.startswith("layers."))
    declared = next(
        (
            config[k]
            for k in _EXPERT_COUNT_KEYS
            if isinstance(config.get(k), int) and config[k] > 0
        ),
        None,
    )
    why = (
        f"its config.json declares {declared} experts per layer, but no tensor "
        "name matches a row of FAMILIES in param_server/core/shards.py (add one "
        "for this family)"
        if declared
        else "it looks like a dense model"
    )
    return (
        f"{src}: no expert tensors recognised in this {arch} ({kind}) "
        f"checkpoint; {why}. Recognised: {dense} layer shard(s) as dense and "
        f"{'a' if GLOBAL_KEY in plan else 'no'} global shard, so lazy expert "
        "loading has nothing to load lazily"
    )


def import_checkpoint(
    store: Store,
    src: str | os.PathLike[str],
    model: str,
    *,
    parent: int | None = None,
    author: str = "import",
    message: str = "",
    metadata: Mapping[str, Any] | None = None,
    allow_schema_change: bool = False,
    progress: bool = False,
    follow_links: bool = False,
    require_experts: bool = False,
) -> CommitResult:
    """Imports a Hugging Face checkpoint folder as a new version of `model`.

    Args:
        store: the destination store.
        src: a folder with config.json and model.safetensors, or sharded
            model-*.safetensors with model.safetensors.index.json.
        model: the model name in the store.
        parent: the version to base the commit on; None means HEAD (or a
            new model). Only shards whose bytes changed get new blobs.
        author, message, metadata: provenance.
        allow_schema_change: accept tensors that differ from the parent's.
        progress: show a progress bar on stderr.
        follow_links: accept symbolic links that lead out of `src` (by
            default they are refused: the folder may not be trusted).
        require_experts: refuse a checkpoint in which no expert tensor is
            recognised (by default that is a warning).

    Raises:
        InvalidInputError: a missing, corrupt or truncated weight file, an
            index naming missing files or tensors, a link out of the folder,
            a `.json` model file that is not JSON, or no experts where
            `require_experts` asked for them.
        StaleParentError, SchemaMismatchError, StoreIOError: see Store.commit.
    """
    src = Path(src)
    if not (src / "config.json").is_file():
        raise InvalidInputError(f"{src} has no config.json; is it a checkpoint folder?")
    model_files = _model_files(src, follow_links)
    mapped = _weight_files(src, follow_links)
    files = sorted(set(mapped.values())) or [src / "model.safetensors"]
    # Validate every header strictly first: a corrupt file fails before any write.
    names_in: dict[Path, list[str]] = {}
    total = 0  # tensor bytes: what the progress bar counts
    for f in files:
        with open(f, "rb") as fh:
            header = read_header(fh, f.stat().st_size, str(f))
        names_in[f] = [t.name for t in header.tensors]
        total += sum(t.end - t.begin for t in header.tensors)
    location = {n: f for f, ns in names_in.items() for n in ns}
    for name, f in mapped.items():
        if location.get(name) != f:
            raise InvalidInputError(
                f"index maps {name!r} to {f.name} but it is not there"
            )

    plan: dict[str, list[str]] = defaultdict(list)
    fused: dict[int, list[str]] = defaultdict(list)
    for name in location:
        key, is_fused = classify(name)
        if is_fused:
            fused[int(key.split(".")[1])].append(name)
        else:
            plan[key].append(name)
    if not fused and not any(parse_expert_key(k) for k in plan):
        if require_experts:
            raise InvalidInputError(_no_experts(src, plan))
        logger.warning("%s", _no_experts(src, plan))

    if parent is None:
        try:
            parent = store.head(model)
        except NotFoundError:
            parent = 0
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
        staging = stack.enter_context(store.staging())
        bar = stack.enter_context(
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"import {model}",
                disable=not progress,
            )
        )

        def get(name: str) -> torch.Tensor:
            t: torch.Tensor = handles[location[name]].get_tensor(name)
            return t

        def stage(
            key: str, tensors: dict[str, torch.Tensor], stacked: list[str]
        ) -> None:
            data = tensor_codec.encode(tensors)
            staging.add(key, data, stacked=stacked)
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))

        for key in sorted(plan):
            stage(key, {n: get(n) for n in sorted(plan[key])}, [])
        for layer, names in sorted(fused.items()):
            whole = {n: get(n) for n in names}
            counts = {n: t.shape[0] for n, t in whole.items() if t.dim() > 0}
            if len(set(counts.values())) != 1 or len(counts) != len(whole):
                raise InvalidInputError(
                    f"layer {layer}: fused expert tensors disagree on the number of "
                    f"experts (dim 0): {counts}"
                )
            for e in range(next(iter(counts.values()))):
                key = expert_key(layer, e)
                if key in plan:
                    raise InvalidInputError(
                        f"layer {layer} expert {e} appears both fused and per-expert"
                    )
                stage(key, {n: t[e] for n, t in whole.items()}, sorted(whole))
        for p in model_files:
            staging.add(p.name, p.read_bytes(), is_file=True)
        bar.close()  # before the commit logs: a line never lands inside the bar
        meta = {"source": "huggingface", **(metadata or {})}
        return store.commit(
            model,
            parent,
            staging,
            author=author,
            message=message or f"import from {src.name}",
            metadata=meta,
            allow_schema_change=allow_schema_change,
        )


# --- export ---------------------------------------------------------------------


def iter_shard_tensors(
    store: Store, manifest: Manifest
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(shard key, tensors) for every shard of a version, verified."""
    for key in sorted(manifest.shards):
        entry = manifest.shards[key]
        path = store.verify_blob(entry.digest)
        with open(path, "rb") as f:
            data = bytearray(f.read())
        yield key, tensor_codec.decode(data, f"blob {entry.digest}")


def checkpoint_tensors(
    manifest: Manifest,
    shards: Iterator[tuple[str, dict[str, torch.Tensor]]],
    on_shard: Callable[[int], None] = lambda n: None,
) -> dict[str, torch.Tensor]:
    """Reassembles checkpoint tensors (restacking fused experts) from shards."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, tensors in shards:
        entry = manifest.shards[key]
        stacked = {t.name for t in entry.tensors if t.stacked}
        for name, t in tensors.items():
            if name in stacked:
                le = parse_expert_key(key)
                if le is None:
                    raise InvalidInputError(
                        f"stacked tensor {name!r} in non-expert shard {key!r}"
                    )
                stacks[name][le[1]] = t
            else:
                out[name] = t
        on_shard(entry.size)
    for name, parts in stacks.items():
        if sorted(parts) != list(range(len(parts))):
            raise InvalidInputError(
                f"fused tensor {name!r} is missing experts: have {sorted(parts)}"
            )
        out[name] = torch.stack([parts[e] for e in range(len(parts))])
    return out


def export_checkpoint(
    store: Store,
    model: str,
    dest: str | os.PathLike[str],
    *,
    version: int | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = False,
) -> Path:
    """Writes a version as a Hugging Face folder that `from_pretrained` loads.

    The folder appears whole or not at all: it is written under a temporary
    name and renamed at the end.

    Raises:
        NotFoundError: unknown model or version.
        IntegrityError: a blob no longer matches its digest.
        InvalidInputError: `dest` exists and is not empty.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise InvalidInputError(
            f"max_shard_bytes must be a positive byte count, got {max_shard_bytes!r}"
        )
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInputError(f"{dest} exists and is not empty; choose a new folder")
    manifest = store.get_manifest(model, version)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir(parents=True)
    try:
        with tqdm(
            total=manifest.total_bytes,
            unit="B",
            unit_scale=True,
            desc=f"export {model}@{manifest.version}",
            disable=not progress,
        ) as bar:
            tensors = checkpoint_tensors(
                manifest, iter_shard_tensors(store, manifest), bar.update
            )
        for name, entry in manifest.files.items():
            shutil.copyfile(store.verify_blob(entry.digest), tmp / name)
        groups: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = tensors[name]
            size += nbytes
        if len(groups) == 1:
            save_file(groups[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            for i, g in enumerate(groups, 1):
                fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                save_file(g, tmp / fname, metadata={"format": "pt"})
                weight_map |= dict.fromkeys(g, fname)
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / _WEIGHT_INDEX).write_text(
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map},
                    indent=2,
                )
            )
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s@%d to %s", model, manifest.version, dest)
    return dest
