"""Federated rounds through real Flower engines, a real gRPC server and Redis."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fed_clients.app import handle_train, identity
from fed_clients.task import Task, make_task, write_initial_checkpoint
from fed_clients.train import build_model, evaluate
from loaders.hotswap import HotSwapper
from loaders.models import load_lazy_model
from param_server.client import ParamClient
from param_server.core.auth import Credentials
from param_server.federation import protocol, wire
from param_server.federation.config import FederationConfig
from param_server.federation.server import AUTHOR, load_state
from param_server.launch.daemon import spawn_daemon
from param_server.launch.deploy import (
    FlowerSecurity,
    LocalDeployment,
    write_app,
)
from param_server.launch.simulation import run_simulation_rounds
from param_server.server.config import ServerConfig
from param_server.server.security import hash_token, new_token
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
from tests.helpers import wait_until
from tests.tls import make_pki

pytestmark = pytest.mark.integration
MODEL = "fed-moe"
FOUR = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


def _serve(store: Path) -> tuple[object, str]:
    srv, port, _ = create_server(
        ServerConfig(store=store, listen="127.0.0.1:0", announce=False)
    )
    srv.start()
    return srv, f"127.0.0.1:{port}"


def _faulty_client_app(root: str, faults: dict[int, str]) -> ClientApp:
    """Our ClientApp, except that some partitions corrupt their replies."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, identity(context, root))
        fault = faults.get(int(context.node_config["partition-id"]))
        arrays = reply.content.array_records[protocol.ARRAYS]
        key = next(k for k in arrays if ".experts." in k)
        t = wire.from_array(arrays[key]).clone()
        if fault == "nan":
            t.view(-1)[0] = math.nan
            arrays[key] = wire.to_array(t)
        elif fault == "shape":
            arrays[key] = wire.to_array(t.view(-1)[:-1].clone())
        return reply

    return app


@pytest.fixture
def fed_store(tmp_path: Path) -> Iterator[tuple[Path, Task]]:
    task = make_task(tmp_path / "task", FOUR, train_docs=128, test_docs=64)
    ckpt = write_initial_checkpoint(
        task, tmp_path / "ckpt", dtype="bfloat16", hidden=32
    )
    import_checkpoint(Store(tmp_path / "store"), ckpt, MODEL)
    yield tmp_path / "store", task


@pytest.mark.timeout(600)
def test_simulation_rejects_bad_updates_commits_the_rest_and_resumes(
    fed_store: tuple[Path, Task],
) -> None:
    store_path, task = fed_store
    store = Store(store_path)
    v1 = store.head(MODEL)
    before = {
        name: t.clone()
        for _, ts in _shards(store_path, v1).items()
        for name, t in ts.items()
    }
    srv, target = _serve(store_path)
    faults = {2: "nan", 3: "shape"}
    cfg = FederationConfig(
        model=MODEL,
        param_server=target,
        num_rounds=1,
        min_clients=2,
        min_available=4,
        local_steps=4,
        batch_size=8,
        trainable="experts+router",
        round_timeout=120.0,  # a lost reply becomes a rejection, never a hang
    )
    try:
        [r1] = run_simulation_rounds(
            cfg, task.root, 4, client_app=_faulty_client_app(task.root, faults)
        )
        # The NaN and the shape-mismatched updates were rejected and recorded;
        # the round committed from the two good institutions.
        assert r1.version == v1 + 1 and r1.round == 1
        m = store.get_manifest(MODEL, r1.version)
        fed = m.metadata["federation"]
        assert m.author == "federation" and m.parent == v1
        assert sorted(c["institution"] for c in fed["contributors"]) == list(FOUR[:2])
        reasons = {r["institution"]: r["reason"] for r in fed["rejected"]}
        assert set(reasons) == set(FOUR[2:])
        assert "NaN/Inf" in reasons["hospital-c"]
        assert re.search(r"shape \[\d+\] but the model's is", reasons["hospital-d"])
        assert fed["strategy"]["name"] == "sparse-fedavg"
        # bf16 end to end: stored bf16, and tensors nobody trained are the
        # very same bits (attention was not trainable).
        after = {
            n: t
            for ts in _shards(store_path, r1.version).values()
            for n, t in ts.items()
        }
        assert {t.dtype for t in after.values()} == {torch.bfloat16}
        attn = [n for n in after if ".self_attn." in n]
        assert attn and all(
            torch.equal(after[n].view(torch.int16), before[n].view(torch.int16))
            for n in attn
        )
        assert any(
            not torch.equal(after[n], before[n]) for n in after if ".experts." in n
        )
        assert len(m.changed) < len(m.shards)  # sparse: only changed shards
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]

    # The server side restarts (new param-server process on the same store):
    # with 3 of 4 valid needed and two bad institutions, nothing is committed.
    srv, target = _serve(store_path)
    try:
        strict = replace(cfg, param_server=target, min_clients=3)
        [r2] = run_simulation_rounds(
            strict, task.root, 4, client_app=_faulty_client_app(task.root, faults)
        )
        assert r2.version is None and "nothing committed" in r2.note
        assert len(r2.rejected) == 2
        assert store.head(MODEL) == r1.version

        # Healthy again: it resumes from HEAD with the next round number.
        good = replace(cfg, param_server=target)
        [r3] = run_simulation_rounds(good, task.root, 4)
        assert r3.round == 2 and r3.version == r1.version + 1
        m3 = store.get_manifest(MODEL, r3.version)
        assert m3.parent == r1.version
        assert m3.metadata["federation"]["round"] == 2
        assert len(m3.metadata["federation"]["contributors"]) == 4
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("strategy", "extra", "setting"),
    [
        ("fedprox", {"proximal_mu": 0.5}, ("proximal_mu", 0.5)),
        ("fedadam", {"server_lr": 0.05}, ("eta", 0.05)),
        ("fedtrimmedavg", {"trim_beta": 0.2}, ("beta", 0.2)),
        ("fedavg", {"dp_clipping_norm": 5.0, "dp_noise_multiplier": 0.01}, None),
    ],
)
def test_flowers_dense_strategies_and_dp_commit_a_bf16_model(
    fed_store: tuple[Path, Task],
    strategy: str,
    extra: dict[str, float],
    setting: tuple[str, float] | None,
) -> None:
    store_path, task = fed_store
    store = Store(store_path)
    v1 = store.head(MODEL)
    srv, target = _serve(store_path)
    try:
        cfg = FederationConfig(
            model=MODEL,
            param_server=target,
            num_rounds=1,
            min_clients=3,
            min_available=3,
            local_steps=2,
            batch_size=8,
            round_timeout=120.0,
            strategy=strategy,
            **extra,  # type: ignore[arg-type]
        )
        [r] = run_simulation_rounds(cfg, task.root, 3)
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]
    assert r.version == v1 + 1, r.note
    m = store.get_manifest(MODEL, r.version)
    fed = m.metadata["federation"]
    assert fed["update_mode"] == "dense" and fed["strategy"]["name"] == strategy
    assert fed["wire_dtype"].startswith("BF16 sent as F32")
    if setting is not None:
        assert fed["strategy"][setting[0]] == setting[1]
    else:
        assert fed["strategy"]["dp"]["clipping_norm"] == 5.0
    assert len(fed["contributors"]) == 3 and not fed["rejected"]
    # What Flower averaged in float32 was rounded back: the store stays bf16.
    assert {
        t.dtype for ts in _shards(store_path, r.version).values() for t in ts.values()
    } == {torch.bfloat16}


def test_a_round_whose_base_moved_is_not_committed_and_the_next_rebases(
    tmp_path: Path, fed_store: tuple[Path, Task]
) -> None:
    """Another writer commits while institutions train: compare-and-set refuses
    that round's commit; the next round starts from the other writer's version."""
    store_path, task = fed_store
    srv, target = _serve(store_path)
    marker = tmp_path / "intruded"
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 0 and not marker.exists():
            marker.touch()
            with ParamClient(target) as c:
                head = c.get_manifest(MODEL)
                g = c.fetch_shards(MODEL, ["global"], manifest=head)["global"]
                c.commit(
                    MODEL,
                    head.version,
                    {"global": {k: t.clone() * 0.5 for k, t in g.items()}},
                    author="someone-else",
                )
        return handle_train(msg, identity(context, task.root))

    store = Store(store_path)
    v1 = store.head(MODEL)
    try:
        cfg = FederationConfig(
            model=MODEL,
            param_server=target,
            num_rounds=2,
            min_clients=2,
            min_available=2,
            local_steps=2,
            batch_size=8,
            round_timeout=120.0,
        )
        r1, r2 = run_simulation_rounds(cfg, task.root, 2, client_app=app)
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]
    assert r1.version is None and "HEAD moved" in r1.note
    assert r2.round == 1 and r2.version == v1 + 2  # v1 + 1 is the other writer's
    m = store.get_manifest(MODEL, r2.version)
    assert m.parent == v1 + 1 and m.metadata["federation"]["base_version"] == v1 + 1
    assert store.get_manifest(MODEL, v1 + 1).author == "someone-else"


def _shards(store_path: Path, version: int) -> dict[str, dict[str, torch.Tensor]]:
    from param_server.store.checkpoints import iter_shard_tensors

    store = Store(store_path)
    return dict(iter_shard_tensors(store, store.get_manifest(MODEL, version)))


@contextlib.contextmanager
def _live_node(
    store_path: Path,
) -> Iterator[tuple[Any, ParamClient, HotSwapper]]:
    """A daemon over `store_path`, a client of it, and a live lazy node of
    MODEL subscribed to its announcements."""
    daemon = spawn_daemon(store_path)
    client = ParamClient(daemon.target, same_host=False, retries=1)
    swapper = None
    try:
        lazy = load_lazy_model(client, MODEL, budget_bytes=10**9)
        swapper = HotSwapper(lazy, reconcile_interval=600).start()
        live = swapper
        wait_until(lambda: live.status().redis_connected, 15, "the subscription")
        yield daemon, client, swapper
    finally:
        if swapper is not None:
            swapper.stop()
        client.close()
        daemon.stop()


@pytest.mark.timeout(900)
def test_deployment_engine_three_supernodes_commit_rounds_a_live_node_swaps_in(
    tmp_path: Path, fed_store: tuple[Path, Task]
) -> None:
    store_path, task = fed_store
    with _live_node(store_path) as (daemon, client, swapper):
        v1 = client.head(MODEL)
        app = write_app(
            tmp_path / "app",
            {
                "model": MODEL,
                "param-server": daemon.target,
                "num-rounds": 2,
                "min-clients": 3,
                "min-available": 3,
                "local-steps": 4,
                "batch-size": 8,
                "round-timeout": 120.0,
            },
        )
        institutions = {n: str(task.data_path(n)) for n in FOUR[:3]}
        with LocalDeployment(tmp_path / "flower", institutions) as flower:
            run_id = flower.submit(app)
            run = flower.wait_for_run(run_id, timeout=400)
            assert run["status"] == "finished:completed"
            versions = client.list_versions(MODEL)
            assert [v.version for v in versions][-3:] == [v1, v1 + 1, v1 + 2]
            for rnd, v in enumerate((v1 + 1, v1 + 2), start=1):
                fed = client.get_manifest(MODEL, v).metadata["federation"]
                assert fed["run_id"] == run_id and fed["round"] == rnd
                assert sorted(c["institution"] for c in fed["contributors"]) == list(
                    FOUR[:3]
                )
                assert all(c["num_examples"] == 128 for c in fed["contributors"])
            # The live node picked both rounds up through Redis and serves the last.
            assert swapper.wait_for_version(v1 + 2, 30)

            # A second run: one institution dies mid-round; the round is left
            # to the other two.
            app2 = write_app(
                tmp_path / "app2",
                {
                    "model": MODEL,
                    "param-server": daemon.target,
                    "num-rounds": 1,
                    "min-clients": 2,
                    "min-available": 3,
                    "local-steps": 4,
                    "batch-size": 8,
                    # Long enough for two institutions on a busy machine; the
                    # dead one's reply is either given up at this deadline or
                    # stood in for by the SuperLink once it misses heartbeats.
                    "round-timeout": 90.0,
                },
            )
            run2 = flower.submit(app2)
            log = tmp_path / "flower" / "supernode-hospital-c.log"
            wait_until(
                lambda: log.read_text().count("Start `flwr-clientapp`") >= 3,
                120,
                "hospital-c to start training in run 2",
            )
            flower.kill("supernode-hospital-c")
            assert flower.wait_for_run(run2, timeout=300)["status"] == (
                "finished:completed"
            )
            m = client.get_manifest(MODEL)
            fed = m.metadata["federation"]
            assert m.version == v1 + 3 and fed["round"] == 3 and fed["run_id"] == run2
            assert sorted(c["institution"] for c in fed["contributors"]) == list(
                FOUR[:2]
            )
            [dead] = fed["rejected"]
            assert dead["node_id"] not in {c["node_id"] for c in fed["contributors"]}
            assert dead["reason"].startswith("no reply"), dead
            assert swapper.wait_for_version(v1 + 3, 30)


def test_the_federated_model_learns_the_task(fed_store: tuple[Path, Task]) -> None:
    """Held-out loss on the union of the institutions' test sets goes down."""
    store_path, task = fed_store
    srv, target = _serve(store_path)
    try:
        with ParamClient(target) as c:
            start = load_state(c, MODEL, dense=False)
        cfg = FederationConfig(
            model=MODEL,
            param_server=target,
            num_rounds=3,
            min_clients=4,
            min_available=4,
            local_steps=10,
            trainable="all",
            lr=1e-2,
            round_timeout=120.0,
        )
        run_simulation_rounds(cfg, task.root, 4)
        with ParamClient(target) as c:
            end = load_state(c, MODEL, dense=False)
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]
    from fed_clients.task import load_split

    held_out = torch.cat([load_split(task.data_path(n), "test") for n in FOUR])
    loss0 = evaluate(build_model(start.config_json, start.tensors), held_out)
    loss1 = evaluate(build_model(end.config_json, end.tensors), held_out)
    assert loss1 < loss0 - 0.3, (loss0, loss1)


def test_secured_deployment_tls_node_auth_and_a_token_refuse_a_stranger(
    tmp_path: Path, fed_store: tuple[Path, Task]
) -> None:
    """Flower over TLS with key-based SuperNode auth, and the param-server over
    TLS with tokens: two registered institutions run a round, committed with a
    writer token and recorded under their registered names and key
    fingerprints; a SuperNode whose key was never registered is refused and
    takes no part; a registered one claiming another institution's name is
    rejected."""
    store_path, task = fed_store
    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens.toml"
    writer = new_token()
    tokens.write_text(
        f'[[token]]\nname = "federation"\nrole = "writer"\n'
        f'sha256 = "{hash_token(writer)}"\nmodels = ["{MODEL}"]\n'
    )
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    daemon = spawn_daemon(
        store_path, announce=False, args=["--tokens-file", str(tokens), *tls]
    )
    try:
        target = f"localhost:{daemon.port}"
        creds = Credentials.from_files(token=writer, ca=pki.ca)
        with ParamClient(target, credentials=creds, same_host=False) as client:
            v1 = client.head(MODEL)
        app = write_app(
            tmp_path / "app",
            {
                "model": MODEL,
                "param-server": target,
                "num-rounds": 1,
                "min-clients": 2,
                "min-available": 3,
                "local-steps": 2,
                "batch-size": 8,
                "round-timeout": 120.0,
            },
        )
        institutions = {n: str(task.data_path(n)) for n in FOUR[:2]}
        security = FlowerSecurity(ca=pki.ca, cert=pki.cert, key=pki.key)
        env = {"PARAM_SERVER_TOKEN": writer, "PARAM_SERVER_CA": str(pki.ca)}
        with LocalDeployment(
            tmp_path / "flower", institutions, security=security, extra_env=env
        ) as flower:
            flower.add_supernode(
                FOUR[2], str(task.data_path(FOUR[2])), registered=False
            )
            stranger = flower.procs[f"supernode-{FOUR[2]}"]
            assert stranger.wait(120) != 0
            log = (tmp_path / "flower" / f"supernode-{FOUR[2]}.log").read_text()
            assert "Failed to activate SuperNode" in log
            superlink_log = (tmp_path / "flower" / "superlink.log").read_text()
            assert "No SuperNode found with the given public key" in superlink_log
            # Registered as hospital-d, but says it is hospital-a.
            flower.add_supernode(
                FOUR[3],
                str(task.data_path(FOUR[3])),
                node_config={"institution": FOUR[0]},
            )
            run = flower.wait_for_run(flower.submit(app), timeout=400)
            assert run["status"] == "finished:completed"
            online = [n for n in flower.supernodes() if n.get("status") == "online"]
            assert len(online) == 3
        with ParamClient(target, credentials=creds, same_host=False) as client:
            m = client.get_manifest(MODEL)
        fed = m.metadata["federation"]
        assert m.version == v1 + 1 and m.author == AUTHOR
        assert sorted(c["institution"] for c in fed["contributors"]) == list(FOUR[:2])
        keys = tmp_path / "flower" / "keys"
        for c in fed["contributors"]:
            pub = (keys / f"{c['institution']}.pub").read_bytes()
            blob = base64.b64decode(pub.split()[1])
            fp = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
            assert c["node_key"] == f"SHA256:{fp}"
            assert c["name_from"] == "registration"
        [impostor] = fed["rejected"]
        assert impostor["institution"] == FOUR[3]  # as registered, not as claimed
        assert f"says it is '{FOUR[0]}'" in impostor["reason"]
    finally:
        daemon.stop()


def _text_app(paths: dict[int, Path]) -> ClientApp:
    """Our ClientApp, each partition an institution with its own text file."""
    from fed_clients.app import Identity

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        part = int(context.node_config["partition-id"])
        who = Identity(f"lab-{part}", paths[part], {"seq-len": 16, "seed": part})
        return handle_train(msg, who)

    return app


@pytest.mark.timeout(300)
def test_institutions_train_on_their_own_text_with_the_models_tokenizer(
    tmp_path: Path,
) -> None:
    """Two institutions with JSON Lines and CSV text of their own kind, a
    third whose file lacks the text field: the tokenizer travels with the
    model from the store to each institution, the two train and are
    committed, and the third's rejection names the fields its file has."""
    import json

    from tests.unit.test_text_data import WORDS, _docs, _tokenizer_files

    task = make_task(tmp_path / "task", ("a", "b", "c"), train_docs=8, test_docs=4)
    ckpt = write_initial_checkpoint(task, tmp_path / "ckpt", hidden=32)
    for name, data in _tokenizer_files(tmp_path).items():
        (ckpt / name).write_bytes(data)
    import_checkpoint(Store(tmp_path / "store"), ckpt, MODEL)
    assert task.vocab_size > len(WORDS) + 5  # the model embeds every id
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(30)))
    reports = tmp_path / "reports.csv"
    reports.write_text("text\n" + "".join(f"{d[::-1]}\n" for d in _docs(30)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"body": d}) + "\n" for d in _docs(30)))
    srv, target = _serve(tmp_path / "store")
    try:
        with ParamClient(target) as c:
            state = load_state(c, MODEL, dense=False)
        assert "tokenizer.json" in state.tokenizer
        cfg = FederationConfig(
            model=MODEL,
            param_server=target,
            num_rounds=1,
            min_clients=2,
            min_available=3,
            local_steps=2,
            batch_size=4,
            round_timeout=120.0,
        )
        [r] = run_simulation_rounds(
            cfg, task.root, 3, client_app=_text_app({0: notes, 1: reports, 2: wrong})
        )
        assert r.version is not None
        fed = (
            Store(tmp_path / "store")
            .get_manifest(MODEL, r.version)
            .metadata["federation"]
        )
        assert sorted(x["institution"] for x in fed["contributors"]) == [
            "lab-0",
            "lab-1",
        ]
        # Each institution measured the round's starting model on its own
        # held-out split; the commit records it.
        for x in fed["contributors"]:
            assert 0 < x["held_out_loss"] < 20
            assert x["held_out_perplexity"] == pytest.approx(
                math.exp(x["held_out_loss"]), rel=1e-4
            )
        [rejected] = fed["rejected"]
        assert "no field 'text'" in rejected["reason"]
        assert "body" in rejected["reason"]
    finally:
        srv.stop(0).wait()  # type: ignore[attr-defined]


@pytest.mark.timeout(600)
def test_a_lora_round_through_the_deployment_engine_on_json_lines(
    tmp_path: Path,
) -> None:
    """Three SuperNodes, each an institution with a JSON Lines file of its own
    kind, train rank-4 adapters on a bf16 model: the round commits only the
    experts the adapters changed, still bf16, every other tensor bit for bit;
    its provenance names the institutions, the mode, the rank and the bytes
    each sent (a fraction of the experts they touched); a live node swaps it in."""
    import json

    from tests.unit.test_text_data import _docs, _tokenizer_files

    task = make_task(tmp_path / "task", ("a",), train_docs=8, test_docs=4)
    ckpt = write_initial_checkpoint(
        task, tmp_path / "ckpt", dtype="bfloat16", hidden=32
    )
    for name, data in _tokenizer_files(tmp_path).items():
        (ckpt / name).write_bytes(data)
    store_path = tmp_path / "store"
    import_checkpoint(Store(store_path), ckpt, MODEL)
    files = {}
    for i, name in enumerate(FOUR[:3]):
        docs = [d if i == 0 else " ".join(d.split()[:: 1 + i]) for d in _docs(40)]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with _live_node(store_path) as (daemon, client, swapper):
        before = client.get_manifest(MODEL)
        app = write_app(
            tmp_path / "app",
            {
                "model": MODEL,
                "param-server": daemon.target,
                "num-rounds": 1,
                "min-clients": 3,
                "min-available": 3,
                "local-steps": 3,
                "batch-size": 4,
                "round-timeout": 120.0,
                "lora-rank": 4,
                "lora-alpha": 8.0,
            },
        )
        with LocalDeployment(tmp_path / "flower", {}) as flower:
            for name, path in files.items():
                flower.add_supernode(name, str(path), node_config={"seq-len": "16"})
            run = flower.wait_for_run(flower.submit(app), timeout=400)
            assert run["status"] == "finished:completed"
        after = client.get_manifest(MODEL)
        assert after.version == before.version + 1
        fed = after.metadata["federation"]
        assert fed["update_mode"] == "lora"
        assert fed["lora"] == {"rank": 4, "alpha": 8.0, "targets": "experts"}
        assert sorted(c["institution"] for c in fed["contributors"]) == list(FOUR[:3])
        changed = [
            k for k in after.shards if after.shards[k].digest != before.shards[k].digest
        ]
        assert changed and all(".experts." in k for k in changed)
        for c in fed["contributors"]:
            assert c["adapters"] > 0 and c["bytes_received"] > 0
            # Rank 4 of 32 x 64 tensors: far less than the tensors themselves.
            assert c["bytes_received"] < c["adapted_bytes"] / 3
        for shard in changed:
            new = client.fetch_shards(MODEL, [shard])[shard]
            assert all(t.dtype == torch.bfloat16 for t in new.values())
        assert swapper.wait_for_version(after.version, 30)
