"""The Flower ClientApp an institution runs.

Identity and data come from the SuperNode's node config:

    flower-supernode ... \
        --node-config "institution='hospital-a' data-path='/data/notes.jsonl'"

`data-path` names the institution's own text (JSON Lines, Parquet, CSV or a
folder of .txt files; see `fed_clients.data` for `text-field`, `eval-path`,
`eval-fraction`, `seq-len`), tokenized with the tokenizer that comes with
the model, or a generated task's `data.safetensors`. `micro-batch-size`
makes a step accumulate gradients over smaller forward passes (a small GPU
or a CPU reaching the configured batch); `train-device` picks where to train
(default: CUDA when there is one) and `train-precision` how (`auto`: bf16
mixed precision on CUDA for a bf16 model, else fp32; `fp32`; `bf16`).

Under the simulation engine (no such node config) the `partition-id` Flower
assigns picks the institution of a generated task folder (`data-root`).

A train message carries the global weights; the reply carries only the
tensors local training changed (sparse mode, stored dtype, bit-exact), all
of them (dense mode, for Flower's own strategies and DP clipping), or in
LoRA mode (`lora-rank` in the round's config) the low-rank adapters of the
experts the institution's data reached (see `fed_clients.lora`), with the
example count and the tokens routed to each expert.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fed_clients.data import TextData, is_text, load_text_splits, tokenizer_from_files
from fed_clients.lora import LoRAConfig
from fed_clients.task import TaskError, check_institution, load_split, load_task
from fed_clients.train import TrainConfig, build_model, evaluate, train_local
from param_server.federation import protocol, wire

logger = logging.getLogger(__name__)

_CLIP_KEY = "clipping_norm"  # what Flower's DP wrapper puts in the train config


@dataclass(frozen=True, slots=True)
class Identity:
    institution: str
    data_path: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    """The node config: options for reading the institution's text."""


def identity(context: Context, data_root: str | None = None) -> Identity:
    """Who this node is and where its data lives.

    Raises:
        TaskError: neither an institution/data-path node config nor a
            simulation partition with a task folder.
    """
    nc: Mapping[str, Any] = context.node_config
    if "institution" in nc:
        name = check_institution(str(nc["institution"]))
        path = nc.get("data-path")
        if not path:
            raise TaskError(
                f"institution {name!r} has no data-path in --node-config; start the "
                "SuperNode with --node-config \"institution='NAME' data-path='FILE'\""
            )
        return Identity(name, Path(str(path)), dict(nc))
    root = (
        data_root
        or context.run_config.get("data-root")
        or os.environ.get("FED_DATA_ROOT")
    )
    if "partition-id" in nc and root:
        task = load_task(str(root))
        name = task.institutions[int(nc["partition-id"]) % len(task.institutions)]
        return Identity(name, task.data_path(name), dict(task.options or {}))
    raise TaskError(
        "this node has no identity: start the SuperNode with --node-config "
        "\"institution='NAME' data-path='FILE'\" (or, in simulation, set data-root)"
    )


def optional_clipping_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's `fixedclipping_mod` when the round asks for clipping, else a no-op."""
    config = msg.content.config_records.get(protocol.CONFIG)
    if config is not None and _CLIP_KEY in config:
        return fixedclipping_mod(msg, ctx, call_next)
    out: Message = call_next(msg, ctx)
    return out


def _received(
    msg: Message,
) -> tuple[ArrayRecord, dict[str, torch.Tensor], ConfigRecord]:
    arrays = msg.content.array_records[protocol.ARRAYS]
    config = msg.content.config_records[protocol.CONFIG]
    return arrays, wire.from_record(arrays, "global"), config


def _reply_metrics(
    n: int, loss: float, tokens: Mapping[int, list[int]]
) -> MetricRecord:
    m = MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: loss})
    for layer, counts in tokens.items():
        m[f"{protocol.TOKENS_PREFIX}{layer}"] = counts
    return m


def load_data(who: Identity, config: ConfigRecord) -> dict[str, torch.Tensor]:
    """The institution's `train` and `test` sequences: its text tokenized with
    the model's tokenizer (sent in the config), or a generated task's ids.

    Raises:
        TaskError: bad data (see `fed_clients.data`), or token ids the model's
            embedding does not have.
    """
    if not is_text(who.data_path):
        return {s: load_split(who.data_path, s) for s in ("train", "test")}
    files = {
        str(k)[len(protocol.TOKENIZER_PREFIX) :]: bytes(v)  # type: ignore[arg-type]
        for k, v in config.items()
        if str(k).startswith(protocol.TOKENIZER_PREFIX)
    }
    tokenizer = tokenizer_from_files(files)
    model = json.loads(str(config[protocol.MODEL_CONFIG]))
    splits = load_text_splits(
        TextData.from_node_config(who.options, who.data_path),
        tokenizer,
        model.get("max_position_embeddings"),
    )
    vocab = int(model.get("vocab_size", 0))
    top = max(int(t.max()) for t in splits.values())
    if vocab and top >= vocab:
        raise TaskError(
            f"the tokenizer makes token id {top} but the model has {vocab} "
            "embeddings; the model and its tokenizer do not match"
        )
    return splits


def _option_int(who: Identity, name: str) -> int | None:
    value = who.options.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TaskError(
            f"{name} in --node-config must be a number, got {value!r}"
        ) from None


def _lora_config(config: ConfigRecord) -> LoRAConfig | None:
    """The round's adapters, when it runs in LoRA mode."""
    rank = int(config.get(protocol.LORA_RANK, 0))  # type: ignore[arg-type]
    if rank <= 0:
        return None
    return LoRAConfig(
        rank=rank,
        alpha=float(config.get(protocol.LORA_ALPHA, 2 * rank)),  # type: ignore[arg-type]
        targets=str(config.get(protocol.LORA_TARGETS, "experts")),
    )


def handle_train(msg: Message, who: Identity) -> Message:
    t0 = time.monotonic()
    arrays, received, config = _received(msg)
    cfg = TrainConfig(
        steps=int(config.get(protocol.LOCAL_STEPS, 20)),  # type: ignore[arg-type]
        batch_size=int(config.get(protocol.BATCH_SIZE, 16)),  # type: ignore[arg-type]
        lr=float(config.get(protocol.LEARNING_RATE, 3e-3)),  # type: ignore[arg-type]
        trainable=str(config.get(protocol.TRAINABLE, "experts")),
        proximal_mu=float(config.get(protocol.PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
        seed=int(config.get(protocol.SEED, 0)) + sum(who.institution.encode()),  # type: ignore[arg-type]
        micro_batch_size=_option_int(who, "micro-batch-size"),
        device=str(who.options["train-device"])
        if "train-device" in who.options
        else None,
        precision=str(who.options.get("train-precision", "auto")),
    )
    lora = _lora_config(config)
    splits = load_data(who, config)
    result = train_local(
        str(config[protocol.MODEL_CONFIG]),
        received,
        splits["train"],
        cfg,
        held_out=splits["test"],
        lora=lora,
    )
    dense = config.get(protocol.UPDATE_MODE) == protocol.DENSE
    out = ArrayRecord()
    changed = 0
    for key in arrays:  # the order sent, as Flower's clipping expects
        new = result.tensors[key]
        same = torch.equal(new, received[key])
        changed += not same
        if dense:
            out[key] = wire.to_numpy_array(new)[0]
        elif not same:
            out[key] = wire.to_array(new)
    for key, (a, b) in result.adapters.items():
        # In the tensor's stored dtype: what the server adds them to.
        dtype = received[key].dtype
        out[key + protocol.LORA_A] = wire.to_array(a.to(dtype))
        out[key + protocol.LORA_B] = wire.to_array(b.to(dtype))
    logger.info(
        "%s: trained %d steps on %d documents, loss %.4f, %d tensor(s) changed%s, "
        "%d bytes to send",
        who.institution,
        cfg.steps,
        result.num_examples,
        result.train_loss,
        changed,
        f", {len(result.adapters)} adapter(s) of rank {lora.rank}" if lora else "",
        sum(len(a.data) for a in out.values()),
    )
    metrics = _reply_metrics(
        result.num_examples, result.train_loss, result.expert_tokens
    )
    metrics[protocol.TRAIN_SECONDS] = time.monotonic() - t0
    if result.held_out_loss is not None and math.isfinite(result.held_out_loss):
        metrics[protocol.HELD_OUT_LOSS] = result.held_out_loss
        metrics[protocol.HELD_OUT_EXAMPLES] = len(splits["test"])
    content = RecordDict(
        {
            protocol.ARRAYS: out,
            protocol.METRICS: metrics,
            protocol.CLIENT: ConfigRecord({protocol.INSTITUTION: who.institution}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, who: Identity) -> Message:
    _, received, config = _received(msg)
    model = build_model(str(config[protocol.MODEL_CONFIG]), received)
    data = load_data(who, config)["test"]
    loss = evaluate(model, data)
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: len(data), protocol.EVAL_LOSS: loss}
            ),
            protocol.CLIENT: ConfigRecord({protocol.INSTITUTION: who.institution}),
        }
    )
    return Message(content=content, reply_to=msg)


def make_client_app(data_root: str | None = None) -> ClientApp:
    """The ClientApp; `data_root` names the task folder for simulation partitions."""
    client_app = ClientApp(mods=[optional_clipping_mod])
    # This runs as its own process per message: transformers' per-load
    # progress bars would only bury the institution's log.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, identity(context, data_root))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, identity(context, data_root))

    return client_app


app = make_client_app()
"""The ClientApp `flwr run` loads (`fed_clients.app:app`)."""
