"""`param-server demo`: the whole path end to end on a tiny model it builds itself."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from param_server.core.errors import StaleParentError
from param_server.core.shards import expert_key, is_expert_key
from param_server.launch.daemon import spawn_daemon
from param_server.store import Store
from param_server.store.checkpoints import export_checkpoint, import_checkpoint

if TYPE_CHECKING:
    from fed_clients.task import Task
    from param_server.client import ParamClient
    from param_server.federation.config import FederationConfig


def run_demo(
    store_dir: Path | None,
    *,
    layers: int,
    experts: int,
    hidden: int,
    rounds: int = 3,
    engine: str = "simulation",
    lora_rank: int = 8,
    verbose: bool = False,
) -> None:
    """Builds a tiny Mixtral, serves it, fetches experts, commits and exports;
    then runs federated rounds that live nodes pick up.

    It prints one line per step; `verbose` adds the libraries' logs and
    progress bars."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from param_server.client import ParamClient
    from param_server.launch.tiny import tiny_mixtral

    if not verbose:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    say = click.echo
    with tempfile.TemporaryDirectory(prefix="param-server-demo-") as tmp:
        work = Path(tmp)
        store = store_dir or work / "store"
        model = tiny_mixtral(
            layers=layers, experts=experts, hidden=hidden, vocab=512, max_positions=256
        )
        ckpt = work / "tiny-mixtral"
        model.save_pretrained(ckpt, max_shard_size="2MB")
        n_files = len(list(ckpt.glob("*.safetensors")))
        say(
            f"1. built a tiny Mixtral ({layers} layers x {experts} experts, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
            f"saved as {n_files} safetensors files + index"
        )

        daemon = spawn_daemon(store)
        try:
            say(
                f"2. param-server daemon pid {daemon.proc.pid} serving store {store} "
                f"on {daemon.target}"
            )
            t = time.perf_counter()
            r = import_checkpoint(
                Store(store),
                ckpt,
                "tiny-mixtral",
                progress=verbose,
                message="demo import",
            )
            m = r.manifest
            say(
                f"3. imported as tiny-mixtral@{m.version}: {len(m.shards)} shards "
                f"({sum(k.count('experts') for k in m.shards)} experts), "
                f"{r.blobs_written} blobs, {r.bytes_written / 2**20:.1f} MiB in "
                f"{time.perf_counter() - t:.2f}s"
            )

            wanted = [
                expert_key(layer, e)
                for layer in range(layers)
                for e in (0, experts - 1)
            ]
            from safetensors.torch import load_file

            source = {
                n: t
                for f in ckpt.glob("*.safetensors")
                for n, t in load_file(f).items()
            }
            for step, same_host in (("4.", False), ("  ", True)):
                with ParamClient(daemon.target, same_host=same_host) as client:
                    client.wait_ready()
                    manifest = client.get_manifest("tiny-mixtral")
                    t = time.perf_counter()
                    shards = client.fetch_shards(
                        "tiny-mixtral", wanted, manifest=manifest
                    )
                    dt = time.perf_counter() - t
                    ok = all(
                        torch.equal(tensor, source[name])
                        for tensors in shards.values()
                        for name, tensor in tensors.items()
                    )
                    s = client.stats
                    how = "mapped same-host" if same_host else "streamed over gRPC"
                    say(
                        f"{step} fetched {len(shards)} experts {how}: "
                        f"{(s.bytes_streamed + s.bytes_mapped) / 2**20:.2f} MiB in "
                        f"{dt * 1000:.1f} ms, bit-exact to the checkpoint: {ok}"
                    )

            with ParamClient(daemon.target) as client:
                _live_node_and_swaps(client, manifest.version, say)

            out = export_checkpoint(Store(store), "tiny-mixtral", work / "exported")
            again = AutoModelForCausalLM.from_pretrained(out).eval()  # type: ignore[no-untyped-call]
            ids = torch.randint(0, model.config.vocab_size, (1, 32))
            with torch.no_grad():
                same = torch.equal(model(ids).logits, again(ids).logits)
            say(
                f"9. exported HEAD to a Hugging Face folder; reloaded logits "
                f"{'are identical' if same else 'DIFFER'} to the original"
            )
            fed_ok = True
            if rounds > 0:
                with ParamClient(daemon.target) as client:
                    fed_ok = _federated_rounds(
                        client,
                        store,
                        work,
                        say,
                        rounds=rounds,
                        engine=engine,
                        lora_rank=lora_rank,
                    )
        finally:
            code = daemon.stop()
            say(f"14. daemon stopped on SIGTERM with exit status {code}")
        if not (same and fed_ok):
            raise SystemExit(1)
    if store_dir is not None:
        say(f"store kept at {os.fspath(store_dir)}")


def _live_node_and_swaps(
    client: ParamClient, base: int, say: Callable[[str], None]
) -> None:
    """A live lazy model serving in a thread while versions come and go."""
    from loaders.hotswap import HotSwapper
    from loaders.models import load_lazy_model

    model = "tiny-mixtral"
    sizes = [
        s.size for k, s in client.get_manifest(model).shards.items() if is_expert_key(k)
    ]
    lazy = load_lazy_model(client, model, budget_bytes=sum(sizes) // 2)
    swapper = HotSwapper(lazy, node_id="demo-node").start()
    ids = torch.randint(0, 512, (1, 16))
    stop = threading.Event()
    passes: list[tuple[float, int]] = []

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                t = time.perf_counter()
                with swapper.hold() as v:
                    lazy.model(ids)
                passes.append((time.perf_counter() - t, v))

    thread = threading.Thread(target=serve, name="demo-serving")
    thread.start()
    try:
        while not passes:
            time.sleep(0.01)
        say(
            f"5. a live node serves {model}@{swapper.applied_version} with half of "
            f"its experts' bytes as budget, subscribed to "
            f"paramserver:versions:{model}"
        )
        key = expert_key(0, 0)
        tensors = client.fetch_shards(model, [key], version=base)[key]
        updated = {n: t.clone() * 0.5 for n, t in tensors.items()}
        before = len(passes)
        c = client.commit(
            model, base, {key: updated}, author="demo", message="halve one expert"
        )
        t0 = time.perf_counter()
        swapped = swapper.wait_for_version(c.manifest.version, 10)
        dt = time.perf_counter() - t0
        st = swapper.status()
        worst = max(p[0] for p in passes[before:] or passes)
        say(
            f"6. committed {model}@{c.manifest.version} changing {key} "
            f"({c.blobs_written} blob); the node "
            + (
                f"swapped to it {dt * 1000:.0f} ms after the commit returned "
                f"(pointer flip {st.last_flip_us or 0:.0f} us), serving on: "
                f"{len(passes) - before} forward passes meanwhile, slowest "
                f"{worst * 1000:.1f} ms"
                if swapped
                else "did NOT swap within 10 s"
            )
        )
        try:
            client.commit(model, base, {key: updated})
        except StaleParentError as e:
            say(f"7. a commit on the stale parent was refused: {type(e).__name__}")
        prev, head = client.rollback(model, base, message="demo rollback")
        t0 = time.perf_counter()
        followed = swapper.wait_for_version(head, 10)
        say(
            f"8. rolled back HEAD {prev} -> {head}; the node "
            + (
                f"followed in {(time.perf_counter() - t0) * 1000:.0f} ms"
                if followed
                else "did NOT follow within 10 s"
            )
        )
        if not (swapped and followed):
            raise SystemExit(1)
    finally:
        stop.set()
        thread.join()
        swapper.stop()
        lazy.close()


FED_MODEL = "fed-moe"


def _federated_rounds(
    client: ParamClient,
    store: Path,
    work: Path,
    say: Callable[[str], None],
    *,
    rounds: int,
    engine: str,
    lora_rank: int = 8,
) -> bool:
    """Three institutions fine-tune a MoE on their own text; two live nodes
    serve each round."""
    from fed_clients.data import TextData, load_text_splits, tokenizer_from_files
    from fed_clients.task import DEFAULT_INSTITUTIONS, Task, write_initial_checkpoint
    from fed_clients.train import evaluate
    from loaders.hotswap import HotSwapper
    from loaders.models import LazyModel, load_lazy_model
    from param_server.federation.config import FederationConfig
    from param_server.launch.demo_text import (
        write_institution_text,
        write_word_tokenizer,
    )

    text_dir = work / "fed-text"
    texts = write_institution_text(text_dir, DEFAULT_INSTITUTIONS)
    ckpt = work / "fed-ckpt"
    words = write_word_tokenizer([p for p, _ in texts.values()], ckpt)
    lines = sum(1 for _ in texts[DEFAULT_INSTITUTIONS[0]][0].open())
    task = Task(
        str(text_dir),
        DEFAULT_INSTITUTIONS,
        vocab_size=-(-words // 64) * 64,
        seq_len=128,
        domains=len(texts),
        train_docs=lines,
        test_docs=0,
        own_share=1.0,
        seed=0,
        data_files={n: p.name for n, (p, _) in texts.items()},
    )
    task.save()
    write_initial_checkpoint(task, ckpt)  # beside the tokenizer's files
    r = import_checkpoint(Store(store), ckpt, FED_MODEL, message="initial weights")
    base = r.manifest.version
    say(
        "10. each institution's own text, as JSON Lines of its own kind "
        "(non-IID): "
        + ", ".join(f"{n} {what} ({lines} lines)" for n, (_, what) in texts.items())
        + f"; a word-level tokenizer ({words} words) and a fresh tiny MoE for it, "
        f"imported with the tokenizer as {FED_MODEL}@{base}"
    )
    tokenizer = tokenizer_from_files(
        {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    )
    # The union of the institutions' held-out splits: the same documents
    # each institution holds out (the same defaults, the same seed).
    held_out = torch.cat(
        [
            load_text_splits(TextData(path), tokenizer, task.seq_len)["test"]
            for path, _ in texts.values()
        ]
    )
    expert_bytes = sum(s.size for k, s in r.manifest.shards.items() if is_expert_key(k))
    nodes: list[tuple[str, LazyModel, HotSwapper]] = []
    for i in (1, 2):
        lazy = load_lazy_model(client, FED_MODEL, budget_bytes=expert_bytes // 2)
        swapper = HotSwapper(lazy, node_id=f"node-{i}").start()
        nodes.append((f"node-{i}", lazy, swapper))

    def served_loss(lazy: LazyModel, swapper: HotSwapper) -> tuple[float, int]:
        with swapper.hold() as v:
            return evaluate(lazy.model, held_out), v

    try:
        loss0, _ = served_loss(nodes[0][1], nodes[0][2])
        say(
            f"11. {len(nodes)} live inference nodes serve {FED_MODEL}@{base} with "
            f"lazy experts (half the expert bytes as budget); held-out loss of the "
            f"served model on the institutions' held-out text: {loss0:.3f}"
        )
        seen: set[int] = set()
        ok = True

        def report(version: int) -> None:
            nonlocal ok
            if version in seen:
                return
            seen.add(version)
            m = client.get_manifest(FED_MODEL, version)
            fed = m.metadata.get("federation", {})
            names = "; ".join(
                f"{c['institution']}: {c['num_examples']} sequences, "
                + (
                    f"{c['adapters']} adapters, "
                    if "adapters" in c
                    else f"{c['tensors']} tensors, "
                )
                + f"{c['bytes_received'] / 1024:.1f} KiB sent"
                + (
                    f" ({c['bytes_received'] / c['adapted_bytes']:.0%} of the "
                    "tensors adapted)"
                    if c.get("adapted_bytes")
                    else ""
                )
                + (
                    f", held-out loss {c['held_out_loss']:.3f} before"
                    if "held_out_loss" in c
                    else ""
                )
                for c in fed.get("contributors", [])
            )
            rejected = len(fed.get("rejected", []))
            say(
                f"    round {fed.get('round')}: committed {FED_MODEL}@{version} "
                f"({len(m.changed)} of {len(m.shards)} shards changed) from {names}"
                + (f"; {rejected} update(s) rejected" if rejected else "")
            )
            for name, lazy, swapper in nodes:
                t0 = time.perf_counter()
                if not swapper.wait_for_version(version, 30):
                    say(f"      {name} did NOT apply @{version} within 30 s")
                    ok = False
                    continue
                dt = time.perf_counter() - t0
                loss, v = served_loss(lazy, swapper)
                say(
                    f"      {name} serves @{v} (applied {dt * 1000:.0f} ms after "
                    f"the commit was reported); held-out loss {loss:.3f}"
                )

        config = FederationConfig(
            model=FED_MODEL,
            param_server=client.target,
            num_rounds=rounds,
            min_clients=len(task.institutions),
            min_available=len(task.institutions),
            local_steps=20,
            trainable="experts" if lora_rank else "all",
            lr=1e-2,
            round_timeout=300,
            lora_rank=lora_rank,
            lora_alpha=2.0 * lora_rank,
            lora_targets="experts+attention",
        )
        how = (
            f"rank-{lora_rank} adapters on experts and attention"
            if lora_rank
            else "whole tensors"
        )
        say(
            f"12. {rounds} federated rounds through Flower's {engine} engine, "
            f"strategy {config.strategy}, institutions send {how} (each round "
            "becomes a version):"
        )
        t0 = time.perf_counter()
        if engine == "simulation":
            from param_server.launch.simulation import run_simulation_rounds

            results = run_simulation_rounds(
                config,
                task.root,
                len(task.institutions),
                on_round=lambda res: report(res.version) if res.version else None,
            )
            committed = [res.version for res in results if res.version]
        else:
            committed = _deployment_rounds(config, task, work, report, client)
        final_loss, v = served_loss(nodes[0][1], nodes[0][2])
        say(
            f"13. {len(committed)} rounds committed in "
            f"{time.perf_counter() - t0:.0f} s; the served model's held-out loss "
            f"went {loss0:.3f} -> {final_loss:.3f} (@{v})"
        )
        return ok and len(committed) == rounds and final_loss < loss0
    finally:
        for _, lazy, swapper in nodes:
            swapper.stop()
            lazy.close()


def _deployment_rounds(
    config: FederationConfig,
    task: Task,
    work: Path,
    report: Callable[[int], None],
    client: ParamClient,
) -> list[int]:
    """The same rounds through a SuperLink and one SuperNode per institution."""

    from param_server.launch.deploy import (
        FlowerRunError,
        LocalDeployment,
        write_app,
    )

    app = write_app(work / "fed-app", config.to_run_config())
    before = client.head(FED_MODEL)
    institutions = {n: str(task.data_path(n)) for n in task.institutions}
    with LocalDeployment(work / "flower", institutions) as flower:
        run_id = flower.submit(app)
        done: dict[str, Any] = {}

        def wait() -> None:
            try:
                done["run"] = flower.wait_for_run(run_id, timeout=3600)
            except FlowerRunError as e:  # raised below, after the last round
                done["error"] = e

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        while waiter.is_alive():
            for v in range(before + 1, client.head(FED_MODEL) + 1):
                report(v)
            time.sleep(0.5)
        for v in range(before + 1, client.head(FED_MODEL) + 1):
            report(v)
        if "error" in done:
            raise done["error"]
    return list(range(before + 1, client.head(FED_MODEL) + 1))
