"""An institution's own text, as packed token sequences for local training.

`data-path` in the SuperNode's node config may name:

- a JSON Lines file (`.jsonl`, `.json`) with a text field (`text-field`,
  "text" by default) or chat `messages` (rendered with the tokenizer's chat
  template),
- a Parquet (`.parquet`) or CSV (`.csv`) file with a text column,
- a folder of `.txt` files (each file one document),
- or the generated demo task's `data.safetensors` (already token ids).

Files are read with Hugging Face `datasets` from local files only (nothing
reaches a hub), tokenized with the tokenizer that travels with the model in
the store, and packed into fixed-length sequences. The held-out split comes
from a separate file when one is given (`eval-path`), else from a fraction
of the documents chosen by the seed, so that it is the same every round and
no document is in both splits.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fed_clients.task import TaskError
from param_server.federation.protocol import TOKENIZER_FILES

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the `datasets` builder that reads it."""


@dataclass(frozen=True, slots=True)
class TextData:
    """Where an institution's text is and how to cut it."""

    path: Path
    text_field: str = "text"
    eval_path: Path | None = None
    eval_fraction: float = 0.1
    seq_len: int = 128
    seed: int = 0

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any], path: Path) -> TextData:
        """Options from `--node-config` (`text-field`, `eval-path`,
        `eval-fraction`, `seq-len`, `seed`) for the text at `path`."""
        try:
            eval_path = nc.get("eval-path")
            return cls(
                path=path,
                text_field=str(nc.get("text-field", "text")),
                eval_path=Path(str(eval_path)) if eval_path else None,
                eval_fraction=float(nc.get("eval-fraction", 0.1)),
                seq_len=int(nc.get("seq-len", 128)),
                seed=int(nc.get("seed", 0)),
            )
        except (TypeError, ValueError) as e:
            raise TaskError(f"bad data option in --node-config: {e}") from e


def is_text(path: Path) -> bool:
    """Whether `path` names text to tokenize (not a generated token task)."""
    return path.is_dir() or path.suffix.lower() in FORMATS


def tokenizer_from_files(files: Mapping[str, bytes]) -> Any:
    """transformers' tokenizer built from the model's tokenizer files.

    Raises:
        TaskError: no tokenizer files, or files transformers cannot load.
    """
    from transformers import AutoTokenizer

    present = {n: b for n, b in files.items() if n in TOKENIZER_FILES}
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        raise TaskError(
            "the model has no tokenizer (no tokenizer.json or tokenizer.model came "
            f"with it; got {sorted(files) or 'no files'}): import the checkpoint "
            "folder together with its tokenizer files"
        )
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        for name, data in present.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise TaskError(f"the model's tokenizer files do not load: {e}") from e


def read_documents(
    path: Path, text_field: str = "text", tokenizer: Any = None
) -> list[str]:
    """The documents at `path`, as strings.

    Raises:
        TaskError: a missing or empty file or folder, an unknown format, or no
            `text_field` (naming the fields there are).
    """
    if not path.exists():
        raise TaskError(f"no data at {path}; check data-path in --node-config")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise TaskError(f"{path} is a folder without .txt files")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(
                f"{path}: unknown data format {path.suffix!r}; use one of "
                f"{', '.join(sorted(FORMATS))}, a folder of .txt files, or a "
                "generated data.safetensors"
            )
        if path.stat().st_size == 0:
            raise TaskError(f"{path} is empty")
        rows = _load(builder, path)
        columns = list(rows.column_names)
        if text_field in columns:
            docs = [str(t) for t in rows[text_field] if t is not None]
        elif "messages" in columns:
            docs = _render_chats(rows["messages"], tokenizer, path)
        else:
            raise TaskError(
                f"{path} has no field {text_field!r} (it has {columns}); set "
                "text-field in --node-config, or give chat 'messages'"
            )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TaskError(f"{path} holds no text")
    return docs


def _load(builder: str, path: Path) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # type: ignore[import-untyped]

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="datasets-") as cache:
        try:
            return datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
            )
        except Exception as e:  # datasets raises many kinds for a bad file
            raise TaskError(f"cannot read {path} as {builder}: {e}") from e


def _render_chats(chats: Sequence[Any], tokenizer: Any, path: Path) -> list[str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TaskError(
            f"{path} holds chat 'messages' but the model's tokenizer has no chat "
            "template; give plain text (text-field) instead"
        )
    out = []
    for messages in chats:
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as e:  # jinja errors for malformed messages
            raise TaskError(f"{path}: a chat does not render: {e}") from e
    return out


def pack(docs: Sequence[str], tokenizer: Any, seq_len: int, what: str) -> torch.Tensor:
    """The documents' tokens, each followed by the end-of-text token, cut into
    int64 [n, seq_len] sequences (a tail shorter than one sequence is dropped).

    Raises:
        TaskError: the text makes less than one sequence.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    if len(ids) < seq_len:
        raise TaskError(
            f"{what} tokenizes to {len(ids)} tokens, fewer than one sequence of "
            f"{seq_len}; give more text or a smaller seq-len"
        )
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def load_text_splits(
    data: TextData, tokenizer: Any, max_positions: int | None = None
) -> dict[str, torch.Tensor]:
    """`train` and `test` token sequences of an institution's text.

    Raises:
        TaskError: any of the bad inputs above, a sequence length the model
            cannot take, or an eval fraction outside (0, 1).
    """
    if data.seq_len < 2:
        raise TaskError(f"seq-len must be at least 2, got {data.seq_len}")
    if max_positions is not None and data.seq_len > max_positions:
        raise TaskError(
            f"seq-len {data.seq_len} is longer than the model takes "
            f"({max_positions} positions); lower seq-len in --node-config"
        )
    docs = read_documents(data.path, data.text_field, tokenizer)
    if data.eval_path is not None:
        held = read_documents(data.eval_path, data.text_field, tokenizer)
        train_docs = docs
    else:
        if not 0.0 < data.eval_fraction < 1.0:
            raise TaskError(
                f"eval-fraction must be between 0 and 1, got {data.eval_fraction}"
            )
        if len(docs) < 2:
            raise TaskError(
                f"{data.path} holds one document; a held-out split needs two or "
                "more (or give eval-path)"
            )
        order = torch.randperm(
            len(docs), generator=torch.Generator().manual_seed(data.seed)
        ).tolist()
        n_eval = min(len(docs) - 1, max(1, round(len(docs) * data.eval_fraction)))
        held = [docs[i] for i in sorted(order[:n_eval])]
        train_docs = [docs[i] for i in sorted(order[n_eval:])]
    return {
        "train": pack(
            train_docs, tokenizer, data.seq_len, f"the training text of {data.path}"
        ),
        "test": pack(
            held, tokenizer, data.seq_len, f"the held-out text of {data.path}"
        ),
    }
