"""The federation's server side: Flower rounds in, committed versions out.

Each round starts from the store's HEAD of the model, sends it to the sampled
institutions, validates every reply, aggregates the valid ones and commits
the changed shards as a new version whose metadata says who contributed, who
was rejected and why, and which strategy ran. The commit is announced like any
other, so live nodes swap it in. Restarted, it continues from HEAD and the
round counter recorded there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from param_server.client import ParamClient
from param_server.core import prequant
from param_server.core.auth import Credentials
from param_server.core.errors import InvalidInputError, StaleParentError
from param_server.core.manifest import Manifest
from param_server.federation import protocol, wire
from param_server.federation.aggregate import (
    ClientUpdate,
    Layout,
    Rejection,
    UpdateRejectedError,
    all_finite,
    contribution_order,
    institution_of,
    parse_reply,
)
from param_server.federation.config import FederationConfig
from param_server.federation.identity import (
    NodeIdentity,
    node_identities,
    registered_name,
    verified_name,
)
from param_server.federation.strategies import SparseFedAvg, build_strategy

logger = logging.getLogger(__name__)

AUTHOR = "federation"


@dataclass(slots=True)
class RoundBase:
    """The version a round starts from, as the server holds it."""

    manifest: Manifest
    layout: Layout
    tensors: dict[str, torch.Tensor]
    """Wire key -> stored values (stored dtype)."""
    arrays: ArrayRecord
    """What goes to clients: raw (sparse) or NumPy-compatible (dense)."""
    sent_dtypes: dict[str, str]
    config_json: str
    last_round: int
    tokenizer: dict[str, bytes] = field(default_factory=dict)
    """The model's tokenizer files (name -> bytes), for institutions with text."""


@dataclass(slots=True)
class RoundResult:
    round: int
    version: int | None
    """The committed version, or None when the round committed nothing."""
    contributors: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    changed_shards: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    wait_seconds: float = 0.0
    """From sending the round to the last reply (Flower transport, polling and
    the institutions' work)."""
    note: str = ""


def last_federated_round(
    client: ParamClient, manifest: Manifest, limit: int = 10_000
) -> int:
    """The round counter recorded on HEAD or its nearest federated ancestor."""
    m: Manifest | None = manifest
    for _ in range(limit):
        if m is None:
            break
        fed = m.metadata.get("federation")
        if isinstance(fed, dict) and isinstance(fed.get("round"), int):
            return int(fed["round"])
        if m.parent <= 0:
            break
        try:
            m = client.get_manifest(m.model, m.parent)
        except LookupError:  # parent collected: no further history
            break
    return 0


def load_state(client: ParamClient, model: str, dense: bool) -> RoundBase:
    """HEAD of `model`, every tensor fetched and verified, ready to send."""
    manifest = client.get_manifest(model)
    if "config.json" not in manifest.files:
        raise InvalidInputError(
            f"{model}@{manifest.version} has no config.json; import a Hugging Face "
            "checkpoint folder so institutions can build the model"
        )
    config_json = bytes(
        client.fetch_blobs(manifest, [], files=["config.json"])["config.json"]
    ).decode()
    try:
        scheme = prequant.scheme_of(json.loads(config_json))
    except (ValueError, InvalidInputError):
        scheme = None  # the clients report a config they cannot build
    if scheme is not None:
        raise InvalidInputError(
            f"{model}@{manifest.version} was imported quantized ({scheme.method}); "
            "federated rounds train full-width weights: import the model's "
            "full-width (bf16) checkpoint under another name and federate that"
        )
    layout = Layout.from_manifest(manifest)
    shards = client.fetch_shards(model, list(manifest.shards), manifest=manifest)
    names = [n for n in protocol.TOKENIZER_FILES if n in manifest.files]
    tokenizer = {
        n: bytes(b)
        for n, b in (
            client.fetch_blobs(manifest, [], files=names).items() if names else ()
        )
    }
    tensors: dict[str, torch.Tensor] = {}
    arrays = ArrayRecord()
    sent: dict[str, str] = {}
    for key, spec in layout.specs.items():
        t = shards[spec.shard][spec.name]
        tensors[key] = t
        arrays[key], sent[key] = wire.encode(t, dense)
    return RoundBase(
        manifest,
        layout,
        tensors,
        arrays,
        sent,
        config_json,
        last_federated_round(client, manifest),
        tokenizer,
    )


def pair_replies(
    sent: Sequence[Message], replies: Sequence[Message], round_timeout: float
) -> tuple[list[Message], list[Rejection]]:
    """Pairs each reply with the instruction it answers, by message id.

    A sampled node gets exactly one outcome: its reply, or one rejection when
    it sent none in time or Flower answered in its place (the SuperLink's
    "node unavailable" once a dead SuperNode misses its heartbeats, or a
    reply whose payload was lost). Those stand-in errors come from the
    SuperLink's own node id, so they are charged to the node the instruction
    went to. Replies to nothing we sent, and second replies, are dropped.

    Returns:
        The replies to parse (a ClientApp's own error among them: parsing
        rejects it with its reason) and the rejections of the silent nodes.
    """
    by_id = {m.metadata.message_id: m for m in sent}
    kept: list[Message] = []
    answered: dict[int, str] = {}  # node -> why it has no update, or ""
    for msg in replies:
        ins = by_id.get(msg.metadata.reply_to_message_id)
        if ins is None:
            logger.warning(
                "dropped a reply from node %d to a message this round did not send",
                msg.metadata.src_node_id,
            )
            continue
        node = ins.metadata.dst_node_id
        if node in answered:
            logger.warning("dropped a second reply for node %d", node)
            continue
        if msg.metadata.src_node_id != node:
            # Not from the node: Flower's stand-in for a reply that never came.
            reason = msg.error.reason if msg.has_error() else "no content"
            code = msg.error.code if msg.has_error() else "-"
            answered[node] = f"no reply (Flower error {code}: {reason})"
            continue
        answered[node] = ""
        kept.append(msg)
    rejected = []
    for ins in sent:
        node = ins.metadata.dst_node_id
        reason = answered.get(node, f"no reply within {round_timeout:g}s")
        if reason:
            rejected.append(Rejection(node, f"node-{node}", reason))
    return kept, rejected


def _vouched(ident: NodeIdentity | None) -> dict[str, str]:
    """Provenance of a contributor's name: registered with the SuperLink under
    its key, or only claimed by the reply."""
    if ident is None:
        return {"name_from": "reply"}
    out = {"name_from": "registration" if ident.name else "reply"}
    if ident.key_fingerprint:
        out["node_key"] = ident.key_fingerprint
    return out


class Federation:
    """Runs rounds of one model against a param-server and a Flower grid."""

    def __init__(
        self,
        config: FederationConfig,
        client: ParamClient,
        *,
        run_id: int = 0,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.run_id = run_id
        self.on_round = on_round
        self.strategy, self.settings = build_strategy(config)
        self.state = load_state(client, config.model, dense=not config.sparse)
        self.results: list[RoundResult] = []
        self._round_started = 0.0

    def train_config(self, rnd: int) -> ConfigRecord:
        c = self.config
        return ConfigRecord(
            {
                protocol.MODEL_CONFIG: self.state.config_json,
                protocol.BASE_VERSION: self.state.manifest.version,
                protocol.UPDATE_MODE: protocol.SPARSE if c.sparse else protocol.DENSE,
                protocol.LOCAL_STEPS: c.local_steps,
                protocol.BATCH_SIZE: c.batch_size,
                protocol.LEARNING_RATE: c.lr,
                protocol.TRAINABLE: c.trainable,
                protocol.SEED: c.seed * 1_000_003 + rnd,
                **(
                    {
                        protocol.LORA_RANK: c.lora_rank,
                        protocol.LORA_ALPHA: c.lora_alpha,
                        protocol.LORA_TARGETS: c.lora_targets,
                    }
                    if c.lora_rank
                    else {}
                ),
                **{
                    protocol.TOKENIZER_PREFIX + n: b
                    for n, b in self.state.tokenizer.items()
                },
            }
        )

    def run(self, grid: Grid) -> list[RoundResult]:
        for _ in range(self.config.num_rounds):
            result = self.run_round(grid)
            self.results.append(result)
            if self.on_round is not None:
                self.on_round(result)
        return self.results

    def run_round(self, grid: Grid) -> RoundResult:
        c, st = self.config, self.state
        rnd = st.last_round + 1
        t0 = self._round_started = time.monotonic()
        if isinstance(self.strategy, SparseFedAvg):
            self.strategy.set_model(st.layout, st.arrays, st.tensors)
        # What the SuperLink vouches for (registered names, key fingerprints).
        ids = node_identities(grid.get_nodes())
        messages = list(
            self.strategy.configure_train(rnd, st.arrays, self.train_config(rnd), grid)
        )
        logger.info(
            "round %d: sent %s@%d to %d institution(s)",
            rnd,
            c.model,
            st.manifest.version,
            len(messages),
        )
        t_send = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=c.round_timeout))
        wait_s = time.monotonic() - t_send
        replies, rejected = pair_replies(messages, replies, c.round_timeout)
        rejected = [
            replace(r, institution=registered_name(ids.get(r.node_id), r.institution))
            for r in rejected
        ]
        for r in rejected:
            logger.warning(
                "round %d: no update from %s: %s", rnd, r.institution, r.reason
            )
        valid_msgs: list[Message] = []
        updates: list[ClientUpdate] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            claimed = institution_of(msg)
            try:
                name = verified_name(node, claimed, ids.get(node))
                u = parse_reply(
                    msg,
                    st.layout,
                    st.tensors,
                    sent_dtypes=st.sent_dtypes,
                    max_update_norm=c.max_update_norm or None,
                    require_all=not c.sparse,
                    lora_rank=c.lora_rank,
                    lora_scale=c.lora_scale,
                )
                u.institution = name
            except UpdateRejectedError as e:
                r = Rejection(node, registered_name(ids.get(node), claimed), str(e))
                logger.warning(
                    "round %d: rejected the update of %s (node %d): %s",
                    rnd,
                    r.institution,
                    r.node_id,
                    r.reason,
                )
                rejected.append(r)
                continue
            updates.append(u)
            valid_msgs.append(msg)
        # Replies arrive in random order; Flower's strategies sum in the
        # order they are given, so fix it (ours sorts by the same key).
        order = sorted(
            range(len(updates)), key=lambda i: contribution_order(updates[i])
        )
        updates = [updates[i] for i in order]
        valid_msgs = [valid_msgs[i] for i in order]
        result = RoundResult(
            rnd,
            None,
            contributors=[
                {
                    "institution": u.institution,
                    "node_id": u.node_id,
                    "num_examples": u.num_examples,
                    "tensors": len(u.tensors),
                    **(
                        {
                            "adapters": len(u.adapters),
                            "adapted_bytes": _adapted_bytes(u, st.tensors),
                        }
                        if c.lora_rank
                        else {}
                    ),
                    "bytes_received": u.bytes_received,
                    "update_norm": round(u.update_norm, 6),
                    "train_seconds": u.train_seconds,
                }
                | _held_out(u.held_out_loss)
                | _vouched(ids.get(u.node_id))
                for u in updates
            ],
            rejected=[r.as_dict() for r in rejected],
        )
        result.wait_seconds = wait_s
        held = [
            f"{u.institution} {f['held_out_loss']:.4f} (ppl "
            f"{f['held_out_perplexity']:.2f})"
            for u in updates
            if (f := _held_out(u.held_out_loss))
        ]
        if held:
            logger.info(
                "round %d: held-out loss of %s@%d by institution: %s",
                rnd,
                c.model,
                st.manifest.version,
                ", ".join(held),
            )
        if len(updates) < c.min_clients:
            result.note = (
                f"only {len(updates)} valid update(s), {c.min_clients} needed "
                "(min-clients); nothing committed"
            )
            logger.warning("round %d: %s", rnd, result.note)
            result.seconds = time.monotonic() - t0
            return result

        if isinstance(self.strategy, SparseFedAvg):
            arrays, metrics = self.strategy.aggregate_updates(updates)
        else:
            arrays, metrics = self.strategy.aggregate_train(rnd, valid_msgs)
        if arrays is None:
            result.note = "the strategy produced no aggregate; nothing committed"
            logger.warning("round %d: %s", rnd, result.note)
            result.seconds = time.monotonic() - t0
            return result
        if metrics is not None and protocol.TRAIN_LOSS in metrics:
            loss = metrics[protocol.TRAIN_LOSS]
            result.train_loss = float(loss) if isinstance(loss, int | float) else None
        # Sparse aggregation already knows which tensors changed; a dense
        # strategy's output is compared with the stored values.
        keys = (
            self.strategy.last_changed
            if isinstance(self.strategy, SparseFedAvg)
            else list(arrays.keys())
        )
        try:
            new = self._stored_values(arrays, keys)
        except InvalidInputError as e:
            result.note = f"{e}; nothing committed"
            logger.error("round %d: %s", rnd, result.note)
            result.seconds = time.monotonic() - t0
            return result
        self._commit(rnd, new, arrays, result, updates)
        result.seconds = time.monotonic() - t0
        return result

    def _stored_values(
        self, arrays: ArrayRecord, keys: list[str]
    ) -> dict[str, torch.Tensor]:
        """Wire key -> aggregated tensor in the stored dtype, for those of `keys`
        that differ from the stored values.

        Raises:
            InvalidInputError: the aggregate has unknown names, other shapes, or
                NaN/Inf (from finite updates, only by overflow).
        """
        st = self.state
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            arr = arrays[key]
            spec = st.layout.specs.get(key)
            if spec is None:
                raise InvalidInputError(f"the strategy returned unknown tensor {key!r}")
            t = wire.from_array(arr, key)
            old = st.tensors[key]
            if t.dtype != old.dtype:
                t = t.to(old.dtype)
            if tuple(t.shape) != spec.shape:
                raise InvalidInputError(f"the strategy changed the shape of {key!r}")
            if t.is_floating_point() and not all_finite(t):
                raise InvalidInputError(f"the aggregate of {key!r} is not finite")
            if not torch.equal(t, old):
                out[key] = t
        return out

    def _commit(
        self,
        rnd: int,
        new: dict[str, torch.Tensor],
        arrays: ArrayRecord,
        result: RoundResult,
        updates: list[ClientUpdate],
    ) -> None:
        c, st = self.config, self.state
        if not new:
            result.note = "no tensor changed; nothing committed"
            return
        shards: dict[str, dict[str, torch.Tensor]] = {}
        for shard in st.layout.shards_of(list(new)):
            shards[shard] = {}
        for key, spec in st.layout.specs.items():
            if spec.shard in shards:
                shards[spec.shard][spec.name] = new.get(key, st.tensors[key])
        fed: dict[str, Any] = {
            "run_id": self.run_id,
            "round": rnd,
            "strategy": self.settings,
            "update_mode": (
                protocol.LORA
                if c.lora_rank
                else protocol.SPARSE
                if c.sparse
                else protocol.DENSE
            ),
            "base_version": st.manifest.version,
            "contributors": result.contributors,
            "rejected": result.rejected,
            "changed_tensors": len(new),
            "timing": {
                "wait_seconds": round(result.wait_seconds, 3),
                "aggregate_seconds": round(
                    time.monotonic() - self._round_started - result.wait_seconds, 3
                ),
            },
            "train": {
                "local_steps": c.local_steps,
                "batch_size": c.batch_size,
                "lr": c.lr,
                "trainable": c.trainable,
            },
        }
        wide = sorted(
            {
                st.layout.specs[k].dtype
                for k, d in st.sent_dtypes.items()
                if d != st.layout.specs[k].dtype
            }
        )
        if c.lora_rank:
            fed["lora"] = {
                "rank": c.lora_rank,
                "alpha": c.lora_alpha,
                "targets": c.lora_targets,
            }
        if wide:
            fed["wire_dtype"] = f"{'/'.join(wide)} sent as F32, rounded back on commit"
        if result.train_loss is not None and math.isfinite(result.train_loss):
            fed["train_loss"] = result.train_loss
        names = ", ".join(sorted({u.institution for u in updates}))
        try:
            r = self.client.commit(
                c.model,
                st.manifest.version,
                shards,
                author=AUTHOR,
                message=f"federated round {rnd}: {len(updates)} institutions ({names})",
                metadata={"federation": fed},
            )
        except StaleParentError as e:
            result.note = (
                f"HEAD moved during the round ({e}); round not committed, the next "
                "round starts from the new HEAD"
            )
            logger.warning("round %d: %s", rnd, result.note)
            self.state = load_state(self.client, c.model, dense=not c.sparse)
            return
        result.version = r.manifest.version
        result.changed_shards = len(shards)
        logger.info(
            "round %d committed as %s@%d (%d shard(s) changed)",
            rnd,
            c.model,
            r.manifest.version,
            len(shards),
        )
        # The next round starts from what was committed, bit for bit. Sparse
        # aggregates already are in the stored dtype and encoding; a dense
        # strategy's float32 results were rounded on commit: re-encode those.
        tensors = dict(st.tensors)
        tensors.update(new)
        if not c.sparse:
            out = ArrayRecord()
            for key, arr in st.arrays.items():
                out[key] = wire.encode(new[key], dense=True)[0] if key in new else arr
            arrays = out
        self.state = RoundBase(
            r.manifest,
            st.layout,
            tensors,
            arrays,
            st.sent_dtypes,
            st.config_json,
            rnd,
            st.tokenizer,
        )


def _adapted_bytes(update: ClientUpdate, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored tensors an update's adapters stand for: what the
    institution would have sent without LoRA."""
    return sum(tensors[k].numel() * tensors[k].element_size() for k in update.adapters)


def _held_out(loss: float | None) -> dict[str, float]:
    """Provenance fields of an institution's held-out loss (and perplexity)."""
    if loss is None:
        return {}
    return {
        "held_out_loss": round(loss, 6),
        "held_out_perplexity": round(math.exp(min(loss, 50.0)), 4),
    }


def make_server_app(
    config: FederationConfig | None = None,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
) -> ServerApp:
    """A ServerApp; with no `config` it reads Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_run_config(context.run_config)
        # Token and TLS files come from the environment (never the run
        # config, which Flower stores and shows).
        credentials = Credentials.from_env()
        with ParamClient.from_url(cfg.param_server, credentials) as client:
            client.wait_ready()
            fed = Federation(cfg, client, run_id=context.run_id, on_round=on_round)
            logger.info(
                "federation of %s starts at %s@%d, round %d",
                cfg.model,
                cfg.model,
                fed.state.manifest.version,
                fed.state.last_round + 1,
            )
            results = fed.run(grid)
        committed = [r.version for r in results if r.version is not None]
        logger.info(
            "federation finished: %d of %d round(s) committed: %s",
            len(committed),
            len(results),
            json.dumps(committed),
        )

    return app


app = make_server_app()
"""The ServerApp `flwr run` loads (`param_server.federation.server:app`)."""
