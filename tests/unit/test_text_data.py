"""An institution's own text: formats, the model's tokenizer, packing, splits,
and an error for every bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fed_clients.data import (
    TextData,
    is_text,
    load_text_splits,
    pack,
    read_documents,
    tokenizer_from_files,
)
from fed_clients.task import TaskError

WORDS = [
    *("the", "patient", "was", "seen", "on", "monday", "and"),
    *("lab", "results", "were", "normal", "again"),
]
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _tokenizer_files(tmp: Path, chat: bool = True) -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["<unk>", "<eos>", ":", *WORDS, "user", "assistant"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    if chat:
        fast.chat_template = CHAT
    out = tmp / "tok"
    fast.save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tokenizer_from_files(_tokenizer_files(tmp_path_factory.mktemp("t")))


def _docs(n: int) -> list[str]:
    """`n` different documents of 12 words."""
    out = [
        " ".join(
            WORDS[k]
            for k in torch.randperm(12, generator=torch.Generator().manual_seed(i))
        )
        for i in range(n)
    ]
    assert len(set(out)) == n
    return out


def _write(path: Path, docs: list[str], field: str = "text") -> Path:
    fmt = path.suffix
    if fmt == ".jsonl":
        path.write_text(
            "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
        )
    elif fmt in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.DataFrame({field: docs, "id": range(len(docs))})
        if fmt == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    else:
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i:03d}.txt").write_text(d)
    return path


@pytest.mark.parametrize("name", ["notes.jsonl", "notes.parquet", "notes.csv", "notes"])
def test_every_format_reads_the_same_documents_and_packs_them(
    tmp_path: Path, tokenizer: Any, name: str
) -> None:
    docs = _docs(20)
    path = _write(tmp_path / name, docs)
    assert is_text(path)
    assert read_documents(path) == docs
    # 12 words and an end-of-text token per document, 13 per row: a row is a
    # document; 5 of 20 are held out, the others train, in file order.
    splits = load_text_splits(TextData(path, seq_len=13, eval_fraction=0.25), tokenizer)
    eos = tokenizer.eos_token_id
    rows = {
        tuple(tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]): i
        for i, d in enumerate(docs)
    }
    assert splits["train"].dtype == torch.int64
    assert splits["train"].shape == (15, 13) and splits["test"].shape == (5, 13)
    train = [rows[tuple(r)] for r in splits["train"].tolist()]
    test = [rows[tuple(r)] for r in splits["test"].tolist()]
    assert train == sorted(train) and sorted(train + test) == list(range(20))
    # Rows longer than a document run on into the next one.
    packed = load_text_splits(TextData(path, seq_len=8, eval_fraction=0.25), tokenizer)
    assert packed["train"].shape == (15 * 13 // 8, 8)


def test_the_split_is_deterministic_and_documents_stay_whole(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = _write(tmp_path / "a.jsonl", _docs(40))
    a = load_text_splits(TextData(path, seq_len=13, seed=3), tokenizer)
    b = load_text_splits(TextData(path, seq_len=13, seed=3), tokenizer)
    c = load_text_splits(TextData(path, seq_len=13, seed=4), tokenizer)
    assert torch.equal(a["test"], b["test"]) and torch.equal(a["train"], b["train"])
    assert not torch.equal(a["test"], c["test"])
    # seq-len 13 = one document per row: no row of the held-out split is trained on.
    train_rows = {tuple(r) for r in a["train"].tolist()}
    assert all(tuple(r) not in train_rows for r in a["test"].tolist())
    assert len(a["test"]) == 4 and len(a["train"]) == 36


def test_a_separate_held_out_file(tmp_path: Path, tokenizer: Any) -> None:
    train = _write(tmp_path / "train.jsonl", _docs(10))
    held = _write(tmp_path / "held.csv", _docs(3))
    s = load_text_splits(TextData(train, eval_path=held, seq_len=13), tokenizer)
    assert len(s["train"]) == 10 and len(s["test"]) == 3


def test_chat_messages_render_with_the_tokenizers_template(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = tmp_path / "chat.jsonl"
    chats = [
        [
            {"role": "user", "content": "the patient"},
            {"role": "assistant", "content": "was seen"},
        ]
    ] * 6
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    docs = read_documents(path, tokenizer=tokenizer)
    assert docs[0] == "user: the patient\nassistant: was seen\n"
    assert len(load_text_splits(TextData(path, seq_len=4), tokenizer)["train"]) > 0


def test_bad_inputs_are_named(tmp_path: Path, tokenizer: Any) -> None:
    def fails(match: str, data: TextData, tok: Any = tokenizer, **kw: int) -> None:
        with pytest.raises(TaskError, match=match):
            load_text_splits(data, tok, **kw)

    fails("no data at", TextData(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    fails("is empty", TextData(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    fails("holds no text", TextData(tmp_path / "blank.jsonl"))
    wrong = _write(tmp_path / "wrong.jsonl", _docs(4), field="body")
    fails(r"no field 'text' \(it has \['body', 'id'\]\)", TextData(wrong))
    assert len(
        load_text_splits(TextData(wrong, text_field="body", seq_len=4), tokenizer)[
            "train"
        ]
    )
    (tmp_path / "bad.xlsx").write_text("x")
    fails("unknown data format '.xlsx'", TextData(tmp_path / "bad.xlsx"))
    (tmp_path / "no-txt").mkdir()
    fails("without .txt files", TextData(tmp_path / "no-txt"))
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    fails("cannot read .* as json", TextData(tmp_path / "junk.jsonl"))
    unknown = _write(tmp_path / "unknown.jsonl", ["zebra quagga okapi"] * 4)
    fails("fewer than one sequence", TextData(unknown, seq_len=64))
    ok = _write(tmp_path / "ok.jsonl", _docs(4))
    fails("longer than the model takes", TextData(ok, seq_len=64), max_positions=32)
    fails("one document", TextData(_write(tmp_path / "one.jsonl", _docs(1)), seq_len=4))
    fails("eval-fraction", TextData(ok, eval_fraction=1.5, seq_len=4))
    with pytest.raises(TaskError, match="no tokenizer"):
        tokenizer_from_files({"config.json": b"{}"})
    plain = tokenizer_from_files(_tokenizer_files(tmp_path, chat=False))
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    fails("no chat template", TextData(chat, seq_len=4), tok=plain)


def test_node_config_options(tmp_path: Path) -> None:
    d = TextData.from_node_config(
        {"text-field": "body", "eval-path": "h.csv", "seq-len": 64, "seed": 2},
        tmp_path / "x.jsonl",
    )
    assert (d.text_field, d.eval_path, d.seq_len, d.seed) == (
        "body",
        Path("h.csv"),
        64,
        2,
    )
    with pytest.raises(TaskError, match="bad data option"):
        TextData.from_node_config({"seq-len": "long"}, tmp_path)
    assert not is_text(tmp_path / "data.safetensors")


def test_pack_drops_only_a_short_tail(tokenizer: Any) -> None:
    out = pack(["the patient was", "seen"], tokenizer, 3, "x")
    # 3 + eos + 1 + eos = 6 tokens: two rows of 3.
    assert (
        out.tolist()[0]
        == tokenizer("the patient was", add_special_tokens=False)["input_ids"]
    )
    assert out.shape == (2, 3)


def test_the_client_reads_its_text_with_the_tokenizer_the_round_carries(
    tmp_path: Path,
) -> None:
    from flwr.app import ConfigRecord

    from fed_clients.app import Identity, load_data
    from param_server.federation import protocol

    model = {"vocab_size": 64, "max_position_embeddings": 32}
    files = {
        protocol.TOKENIZER_PREFIX + n: b for n, b in _tokenizer_files(tmp_path).items()
    }
    config = ConfigRecord({protocol.MODEL_CONFIG: json.dumps(model), **files})
    who = Identity("lab", _write(tmp_path / "n.jsonl", _docs(10)), {"seq-len": 13})
    splits = load_data(who, config)
    assert splits["train"].shape == (9, 13) and splits["test"].shape == (1, 13)

    def fails(match: str, config: ConfigRecord, who: Identity = who) -> None:
        with pytest.raises(TaskError, match=match):
            load_data(who, config)

    small = {**model, "vocab_size": 5}
    fails(
        "has 5 embeddings",
        ConfigRecord({protocol.MODEL_CONFIG: json.dumps(small), **files}),
    )
    fails("no tokenizer", ConfigRecord({protocol.MODEL_CONFIG: json.dumps(model)}))
    long = Identity("lab", who.data_path, {"seq-len": 64})
    fails("longer than the model takes", config, long)
