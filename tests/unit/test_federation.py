"""Federation pieces without engines: wire format, validation, sparse averaging."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fed_clients.task import TaskError, load_split, load_task, make_task
from fed_clients.train import _from_checkpoint_layout, _to_checkpoint_layout
from param_server.core.errors import InvalidInputError
from param_server.federation import protocol, wire
from param_server.federation.aggregate import (
    ClientUpdate,
    Layout,
    UpdateRejectedError,
    WireTensor,
    all_finite,
    merge_into_record,
    parse_reply,
    sparse_average,
)
from param_server.federation.config import FederationConfig
from param_server.federation.identity import (
    NodeIdentity,
    key_fingerprint,
    node_identities,
    registered_name,
    verified_name,
)
from param_server.federation.server import pair_replies
from param_server.federation.strategies import build_strategy

# --- wire format -------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int64],
)
def test_wire_round_trip_is_bit_exact_through_flower_serialisation(
    dtype: torch.dtype,
) -> None:
    t = (torch.randn(5, 7) * 3).to(dtype)
    arr = wire.to_array(t)
    assert arr.dtype != "float32" or dtype == torch.float32  # never widened
    # Flower's own transport encoding: deflate into chunks and inflate back.
    again = Array.inflate(arr.deflate(), children=arr.children)
    back = wire.from_array(again)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_flower_refuses_bf16_that_is_why_we_carry_raw_bytes() -> None:
    with pytest.raises(TypeError):
        Array(torch.ones(2, dtype=torch.bfloat16))


def test_numpy_arrays_are_read_without_np_load_and_match_it() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    arr = Array(a)
    assert arr.stype == wire.NUMPY_STYPE
    t = wire.from_array(arr)
    assert np.array_equal(t.numpy(), np.load(io.BytesIO(arr.data)))
    assert wire.dtype_name(arr) == "F32"


def test_truncated_or_unknown_arrays_are_refused_clearly() -> None:
    arr = wire.to_array(torch.ones(4, 4))
    cut = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[:-4])
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        wire.from_array(cut)
    odd = Array(dtype="F32", shape=(1,), stype="pickle", data=b"\0" * 4)
    with pytest.raises(InvalidInputError, match="unknown array encoding"):
        wire.from_array(odd)


# --- helpers ------------------------------------------------------------------


def _layout() -> Layout:
    specs = [
        WireTensor("dense.w", "layers.0.dense", "dense.w", "F32", (2, 2), None),
        WireTensor("e0.w", "layers.0.experts.0", "e0.w", "F32", (3,), (0, 0)),
        WireTensor("e1.w", "layers.0.experts.1", "e1.w", "F32", (3,), (0, 1)),
        WireTensor("e2.w", "layers.0.experts.2", "e2.w", "BF16", (2,), (0, 2)),
        WireTensor("head", "global", "head", "F32", (2,), None),
    ]
    return Layout({s.key: s for s in specs})


def _current() -> dict[str, torch.Tensor]:
    return {
        "dense.w": torch.zeros(2, 2),
        "e0.w": torch.zeros(3),
        "e1.w": torch.zeros(3),
        "e2.w": torch.zeros(2, dtype=torch.bfloat16),
        "head": torch.tensor([5.0, 6.0]),
    }


def _update(n: int, tensors: dict[str, torch.Tensor], **tokens: float) -> ClientUpdate:
    return ClientUpdate(
        node_id=n,
        institution=f"inst-{n}",
        num_examples=n,
        tensors=tensors,
        expert_tokens={(0, int(k[1:])): v for k, v in tokens.items()},
    )


# --- sparse averaging -----------------------------------------------------------


def test_sparse_average_matches_a_hand_computed_weighted_mean_per_tensor() -> None:
    # Client 1 (1 example) sent dense.w and e0; client 2 (2 examples) sent
    # dense.w and e1; client 3 (3 examples) sent e0 and e1. Nobody sent head.
    u1 = _update(1, {"dense.w": torch.full((2, 2), 1.0), "e0.w": torch.full((3,), 4.0)})
    u2 = _update(2, {"dense.w": torch.full((2, 2), 4.0), "e1.w": torch.full((3,), 2.0)})
    u3 = _update(3, {"e0.w": torch.full((3,), 8.0), "e1.w": torch.full((3,), 6.0)})
    out = dict(sparse_average([u1, u2, u3], _layout()))
    assert set(out) == {"dense.w", "e0.w", "e1.w"}  # head untouched
    # dense.w: (1*1 + 2*4) / 3 = 3
    assert torch.allclose(out["dense.w"], torch.full((2, 2), 3.0))
    # e0: (1*4 + 3*8) / 4 = 7  (client 2 did not send it: it does not count)
    assert torch.allclose(out["e0.w"], torch.full((3,), 7.0))
    # e1: (2*2 + 3*6) / 5 = 4.4
    assert torch.allclose(out["e1.w"], torch.full((3,), 4.4))


def test_flowers_helper_gets_the_same_subsets_wrong() -> None:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    def rec(n: int, arrays: dict[str, float]) -> RecordDict:
        return RecordDict(
            {
                "arrays": ArrayRecord(
                    {k: Array(np.full(3, v, np.float32)) for k, v in arrays.items()}
                ),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )

    out = aggregate_arrayrecords(
        [rec(1, {"e0": 4.0}), rec(3, {"e0": 8.0, "e1": 6.0})], "num-examples"
    )
    # e1 came from one client but is scaled by its share of *all* examples.
    assert out["e1"].numpy()[0] == pytest.approx(4.5)  # ours: 6.0
    ours = dict(
        sparse_average(
            [
                _update(1, {"e0.w": torch.full((3,), 4.0)}),
                _update(
                    3, {"e0.w": torch.full((3,), 8.0), "e1.w": torch.full((3,), 6.0)}
                ),
            ],
            _layout(),
        )
    )
    assert float(ours["e1.w"][0]) == 6.0 and float(ours["e0.w"][0]) == 7.0


def test_expert_tensors_are_weighted_by_routed_tokens_when_all_report_them() -> None:
    u1 = _update(1, {"e0.w": torch.full((3,), 0.0), "dense.w": torch.ones(2, 2)}, e0=30)
    u2 = _update(
        9, {"e0.w": torch.full((3,), 10.0), "dense.w": torch.zeros(2, 2)}, e0=10
    )
    out = dict(sparse_average([u1, u2], _layout()))
    # tokens 30:10 (not examples 1:9) for the expert...
    assert torch.allclose(out["e0.w"], torch.full((3,), 2.5))
    # ...examples for the dense tensor.
    assert torch.allclose(out["dense.w"], torch.full((2, 2), 0.1))
    # One contributor without token counts: examples for everyone.
    u2.expert_tokens = {}
    out = dict(sparse_average([u1, u2], _layout()))
    assert torch.allclose(out["e0.w"], torch.full((3,), 9.0))


def test_bf16_is_averaged_once_and_a_single_sender_comes_back_bit_exact() -> None:
    x = torch.tensor([1.0039062, -3.3e-3], dtype=torch.bfloat16)
    out = dict(sparse_average([_update(2, {"e2.w": x})], _layout()))
    assert out["e2.w"].dtype == torch.bfloat16
    assert torch.equal(out["e2.w"].view(torch.int16), x.view(torch.int16))
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, 2.015625], dtype=torch.bfloat16)  # next bf16 values
    out = dict(
        sparse_average([_update(1, {"e2.w": a}), _update(1, {"e2.w": b})], _layout())
    )
    want = ((a.float() + b.float()) / 2).to(torch.bfloat16)
    assert torch.equal(out["e2.w"], want)


def test_a_rounds_result_does_not_depend_on_the_order_replies_arrive_in() -> None:
    import itertools

    g = torch.Generator().manual_seed(3)
    updates = [
        ClientUpdate(
            node_id=100 - i,
            institution=f"inst-{i}",
            num_examples=n,
            tensors={
                "dense.w": torch.randn(2, 2, generator=g),
                "e0.w": torch.randn(3, generator=g) * 10 ** (i - 2),
            },
        )
        for i, n in enumerate((7, 19, 41, 3))
    ]
    results = [
        dict(sparse_average(list(order), _layout()))
        for order in itertools.permutations(updates)
    ]
    for r in results[1:]:
        assert all(torch.equal(r[k], results[0][k]) for k in results[0])


def _exact_rounding(q: Fraction, dtype: torch.dtype) -> float:
    """The `dtype` value nearest to `q`, ties to the even one, by exact maths."""
    r = torch.tensor(float(q), dtype=torch.float64).to(dtype)
    cands = [
        r,
        torch.nextafter(r, torch.tensor(math.inf, dtype=dtype)),
        torch.nextafter(r, torch.tensor(-math.inf, dtype=dtype)),
    ]
    bits = torch.int16 if dtype != torch.float32 else torch.int32

    def rank(c: torch.Tensor) -> tuple[Fraction, int]:
        return abs(Fraction(float(c)) - q), int(c.view(bits)) & 1

    return float(min(cands, key=rank))


def test_the_issue_s_bf16_tie_rounds_half_to_even() -> None:
    values = (0.032958984375, -0.01275634765625, -0.043701171875)
    updates = [
        _update(n, {"e2.w": torch.tensor([v, -v], dtype=torch.bfloat16)})
        for v, n in zip(values, (7, 19, 41), strict=True)
    ]
    out = dict(sparse_average(updates, _layout()))["e2.w"]
    # The exact mean is the tie -0.02691650390625.
    assert out.tolist() == [-0.02685546875, 0.02685546875]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_means_are_correctly_rounded(dtype: torch.dtype) -> None:
    """Guaranteed for bf16 and fp16; for fp32 it holds on these values (the
    guarantee allows one ulp where the mean is within ~2^-50 of a tie)."""
    g = torch.Generator().manual_seed(11)
    n = 3000
    base = torch.randn(n, generator=g).to(dtype)
    xs = [
        # Close values (ties and near-ties are frequent), exact cancellations,
        # and values of very different magnitudes.
        base,
        (base.float() + torch.randint(-2, 3, (n,), generator=g) * 2e-3).to(dtype),
        -base,
        (torch.randn(n, generator=g) * 100).to(dtype),
    ]
    xs[3][: n // 3] = 0  # where it sends zeros, pairs 0 and 2 cancel exactly
    weights = (5, 7, 5, 2)
    spec = WireTensor("x", "global", "x", "F", (n,), None)
    updates = [
        ClientUpdate(node_id=i, institution=f"i{i}", num_examples=w, tensors={"x": x})
        for i, (x, w) in enumerate(zip(xs, weights, strict=True))
    ]
    out = dict(sparse_average(updates, Layout({"x": spec})))["x"]
    assert out.dtype == dtype
    total = sum(weights)
    for j in range(n):
        q = (
            sum(
                (Fraction(float(x[j])) * w for x, w in zip(xs, weights, strict=True)),
                Fraction(0),
            )
            / total
        )
        want = _exact_rounding(q, dtype)
        assert float(out[j]) == want, (j, [float(x[j]) for x in xs], q)
        if q == 0:
            assert float(out[j]) == 0.0


def test_averaging_in_chunks_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from param_server.federation import aggregate

    g = torch.Generator().manual_seed(5)
    updates = [
        _update(n, {"dense.w": torch.randn(2, 2, generator=g)}) for n in (3, 5, 9)
    ]
    whole = dict(sparse_average(updates, _layout()))["dense.w"]
    monkeypatch.setattr(aggregate, "_CHUNK", 3)  # 4 elements: chunks of 3 and 1
    chunked = dict(sparse_average(updates, _layout()))["dense.w"]
    assert torch.equal(whole, chunked) and chunked.shape == (2, 2)


def test_merge_keeps_untouched_arrays_as_the_same_objects() -> None:
    current = wire.to_record(_current())
    merged, changed = merge_into_record(
        current, iter([("e0.w", torch.ones(3)), ("e1.w", torch.zeros(3))])
    )
    assert changed == ["e0.w"]  # e1 averaged to its old value: not a change
    assert merged["head"] is current["head"]
    assert list(merged) == list(current)
    assert torch.equal(wire.from_array(merged["e0.w"]), torch.ones(3))


# --- validation -------------------------------------------------------------------


def _reply(
    arrays: dict[str, torch.Tensor | Array],
    *,
    n: float = 4,
    institution: str = "hospital-a",
    node: int = 7,
    **metrics: float | list[float],
) -> Message:
    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = v if isinstance(v, Array) else wire.to_array(v)
    content = RecordDict(
        {
            protocol.ARRAYS: rec,
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, **metrics}),
            protocol.CLIENT: ConfigRecord({protocol.INSTITUTION: institution}),
        }
    )
    md = Metadata(7, "", node, 1, "", "", 0.0, 60.0, MessageType.TRAIN)
    return make_message(md, content)


def _parse(msg: Message, **kw: object) -> ClientUpdate:
    layout = _layout()
    return parse_reply(
        msg,
        layout,
        _current(),
        sent_dtypes={k: s.dtype for k, s in layout.specs.items()},
        **kw,  # type: ignore[arg-type]
    )


def test_a_good_reply_parses_with_institution_and_token_counts() -> None:
    u = _parse(_reply({"e0.w": torch.ones(3)}, **{"expert-tokens.0": [5, 0, 2]}))
    assert u.institution == "hospital-a" and u.num_examples == 4
    assert u.expert_tokens == {(0, 0): 5.0, (0, 1): 0.0, (0, 2): 2.0}
    assert u.update_norm == 0.0  # no bound asked: not computed


@pytest.mark.parametrize(
    ("arrays", "kw", "reason"),
    [
        ({"e0.w": torch.tensor([1.0, math.nan, 0.0])}, {}, "NaN/Inf"),
        ({"e0.w": torch.tensor([1.0, math.inf, 0.0])}, {}, "NaN/Inf"),
        ({"e0.w": torch.ones(4)}, {}, r"shape \[4\] but the model's is \[3\]"),
        ({"e0.w": torch.ones(3, dtype=torch.float16)}, {}, "dtype F16 but"),
        ({"e2.w": torch.ones(2)}, {}, "dtype F32 but the model's is BF16"),
        ({"../../etc/passwd": torch.ones(3)}, {}, "unknown tensor name"),
        (
            {"e0.w": torch.full((3,), 10.0)},
            {"max_update_norm": 1.0},
            "exceeds the bound",
        ),
        ({"e0.w": torch.ones(3)}, {"require_all": True}, "dense update has 1 of 5"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(
    arrays: dict[str, torch.Tensor], kw: dict[str, object], reason: str
) -> None:
    with pytest.raises(UpdateRejectedError, match=reason):
        _parse(_reply(arrays), **kw)


def test_sparse_fedavg_as_a_stock_strategy_leaves_a_nan_reply_out() -> None:
    """Flower's entry point behaves like the project's own round path."""
    from param_server.federation.strategies import SparseFedAvg

    strategy = SparseFedAvg(min_train_nodes=2)
    current = _current()
    strategy.set_model(_layout(), wire.to_record(current), current)
    replies = [
        _reply({"e0.w": torch.full((3,), 1.0)}, n=1, institution="a", node=1),
        _reply({"e0.w": torch.tensor([1.0, math.nan, 0.0])}, institution="b", node=2),
        _reply({"e0.w": torch.full((3,), 4.0)}, n=2, institution="c", node=3),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert wire.from_array(arrays["e0.w"]).tolist() == [3.0, 3.0, 3.0]
    assert metrics[protocol.NUM_EXAMPLES] == 3
    (rejected,) = strategy.last_rejected
    assert (rejected.node_id, rejected.institution) == (2, "b")
    assert "NaN/Inf" in rejected.reason
    # Fewer valid replies than min_train_nodes: no aggregate, no exception.
    assert strategy.aggregate_train(2, replies[:2]) == (None, None)


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([3e38, 3e38, -1.0], torch.float32, True),  # the sum overflows; all finite
        ([6e4, 6e4], torch.float16, True),
        ([1.0, math.inf], torch.float32, False),
        ([math.inf, -math.inf], torch.float32, False),
        ([1.0, math.nan], torch.bfloat16, False),
        ([1e308, 1e308], torch.float64, True),
    ],
)
def test_finiteness_check_is_exact(
    values: list[float], dtype: torch.dtype, finite: bool
) -> None:
    assert all_finite(torch.tensor(values, dtype=dtype)) is finite


def test_norm_bound_measures_distance_from_the_global_model() -> None:
    u = _parse(_reply({"head": torch.tensor([8.0, 10.0])}), max_update_norm=5.0)
    assert u.update_norm == pytest.approx(5.0)  # |(3, 4)|


@pytest.mark.parametrize("n", [0, -3, 2.5, math.nan])
def test_bad_example_counts_are_rejected(n: float) -> None:
    with pytest.raises(UpdateRejectedError, match="num-examples"):
        _parse(_reply({"e0.w": torch.ones(3)}, n=n))


def test_a_corrupt_payload_is_rejected_not_raised() -> None:
    good = wire.to_array(torch.ones(3))
    cut = Array(dtype="F32", shape=(3,), stype=wire.RAW_STYPE, data=good.data[:5])
    with pytest.raises(UpdateRejectedError, match="truncated"):
        _parse(_reply({"e0.w": cut}))


def _ins(node: int) -> Message:
    md = Metadata(7, f"ins-{node}", 1, node, "", "", 0.0, 60.0, MessageType.TRAIN)
    return make_message(md, RecordDict())


def _answer(
    ins: Message, src: int | None = None, error: Error | None = None
) -> Message:
    node = ins.metadata.dst_node_id
    src = node if src is None else src
    md = Metadata(
        7,
        f"re-{node}",
        src,
        1,
        ins.metadata.message_id,
        "",
        0.0,
        60.0,
        MessageType.TRAIN,
    )
    if error is not None:
        return make_message(md, error=error)
    return make_message(md, RecordDict())


def test_each_sampled_node_gets_one_outcome_whoever_answered_for_it() -> None:
    """A dead SuperNode's stand-in error comes from the SuperLink's node id: it is
    charged to the dead node, once, and not counted again as a silent one."""
    sent = [_ins(n) for n in (11, 12, 13, 14, 15)]
    gone = Error(ErrorCode.NODE_UNAVAILABLE, "node missed its heartbeats")
    crashed = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom")
    stray = _answer(_ins(99))
    replies = [
        _answer(sent[0]),
        _answer(sent[0]),  # a second reply for the same node
        _answer(sent[1], src=SUPERLINK_NODE_ID, error=gone),
        _answer(sent[2], error=crashed),  # the ClientApp's own error
        stray,  # answers nothing this round sent
        _answer(sent[4]),
    ]
    kept, rejected = pair_replies(sent, replies, 30.0)
    assert [m.metadata.src_node_id for m in kept] == [11, 13, 15]
    assert [(r.node_id, r.institution) for r in rejected] == [
        (12, "node-12"),
        (14, "node-14"),
    ]
    assert "missed its heartbeats" in rejected[0].reason
    assert rejected[1].reason == "no reply within 30s"
    # The ClientApp's error is kept for parsing, which rejects it with its reason.
    with pytest.raises(UpdateRejectedError, match="boom"):
        _parse(kept[1])


def test_registered_names_and_key_fingerprints_come_from_the_superlink() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.node_pb2 import NodeInfo

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    ssh = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # What `ssh-keygen -lf key.pub` prints, computed from the file's blob.
    blob_sha = hashlib.sha256(base64.b64decode(ssh.split()[1])).digest()
    want = "SHA256:" + base64.b64encode(blob_sha).decode().rstrip("=")
    assert key_fingerprint(pem) == key_fingerprint(ssh) == want
    assert key_fingerprint(b"-----BEGIN PUBLIC KEY-----\nnot a key\n") == ""
    # The simulation engine's nodes carry random bytes.
    assert key_fingerprint(bytes(range(7, 40))) == ""
    assert key_fingerprint(b"ssh-ed448 AAAA") == ""

    ids = node_identities(
        [
            NodeInfo(node_id=5, name="hospital-a", public_key=pem),
            NodeInfo(node_id=6, public_key=pem),  # registered without a name
            NodeInfo(node_id=7),  # no node authentication
        ]
    )
    assert ids == {
        5: NodeIdentity("hospital-a", want),
        6: NodeIdentity("", want),
    }
    assert verified_name(5, "hospital-a", ids[5]) == "hospital-a"
    assert verified_name(5, "node-5", ids[5]) == "hospital-a"  # no claim made
    assert verified_name(6, "hospital-b", ids[6]) == "hospital-b"  # only a claim
    assert verified_name(7, "hospital-c", None) == "hospital-c"
    with pytest.raises(UpdateRejectedError, match="registered as 'hospital-a'"):
        verified_name(5, "hospital-b", ids[5])
    assert registered_name(ids[5], "node-5") == "hospital-a"
    assert registered_name(ids[6], "node-6") == "node-6"
    assert registered_name(None, "node-7") == "node-7"


# --- config and strategies ----------------------------------------------------------


def test_run_config_is_parsed_once_and_checked() -> None:
    cfg = FederationConfig.from_run_config(
        {
            "model": "m",
            "num-rounds": 4,
            "lr": 1,
            "strategy": "fedprox",
            "data-root": "x",
        }
    )
    assert cfg.num_rounds == 4 and cfg.lr == 1.0 and not cfg.sparse
    with pytest.raises(InvalidInputError, match="unknown strategy 'fedsgd'"):
        FederationConfig.from_run_config({"model": "m", "strategy": "fedsgd"})
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(InvalidInputError, match="needs model="):
        FederationConfig.from_run_config({"num-rounds": 1})
    for bad, why in (
        (
            {"num-round": 5},
            "unknown run config key 'num-round'; did you mean 'num-rounds'",
        ),
        ({"lr": "fast"}, "'lr' needs a number"),
        ({"num-rounds": 2.5}, "'num-rounds' needs a finite int"),
        ({"lr": float("nan")}, "'lr' needs a finite float"),
        ({"weight-by-tokens": "false"}, "'weight-by-tokens' needs bool"),
        ({"num-rounds": True}, "'num-rounds' needs int"),
        ({"param-server": 50051}, "'param-server' needs a string"),
    ):
        with pytest.raises(InvalidInputError, match=re.escape(why)):
            FederationConfig.from_run_config({"model": "m", **bad})


@pytest.mark.parametrize(
    ("name", "cls", "setting"),
    [
        ("sparse-fedavg", "SparseFedAvg", "weight_by_tokens"),
        ("fedavg", "FedAvg", None),
        ("fedprox", "FedProx", "proximal_mu"),
        ("fedadam", "FedAdam", "eta"),
        ("fedtrimmedavg", "FedTrimmedAvg", "beta"),
    ],
)
def test_every_strategy_builds_and_says_what_it_is(
    name: str, cls: str, setting: str | None
) -> None:
    strategy, settings = build_strategy(FederationConfig(model="m", strategy=name))
    assert type(strategy).__name__ == cls
    assert settings["name"] == name
    assert setting is None or setting in settings


def test_dp_wraps_dense_strategies_and_is_refused_for_sparse() -> None:
    dp = {"dp_clipping_norm": 1.0, "dp_noise_multiplier": 0.5}
    strategy, settings = build_strategy(
        FederationConfig(model="m", strategy="fedavg", **dp)  # type: ignore[arg-type]
    )
    assert type(strategy).__name__ == "DifferentialPrivacyClientSideFixedClipping"
    assert settings["dp"]["clipping_norm"] == 1.0
    with pytest.raises(InvalidInputError, match="needs dense updates"):
        FederationConfig(model="m", **dp)  # type: ignore[arg-type]


# --- the task ---------------------------------------------------------------


def test_task_is_deterministic_non_iid_and_loadable(tmp_path: Path) -> None:
    a = make_task(tmp_path / "a", seed=3)
    b = make_task(tmp_path / "b", seed=3)
    assert load_task(tmp_path / "a") == a
    for name in a.institutions:
        ta, tb = (
            load_split(a.data_path(name), "train"),
            load_split(b.data_path(name), "train"),
        )
        assert torch.equal(ta, tb)
    # Institution i mostly holds its own two domains (the tag token).
    for i, name in enumerate(a.institutions):
        tags = load_split(a.data_path(name), "train")[:, 0]
        own = ((tags == 2 * i) | (tags == 2 * i + 1)).float().mean()
        assert own > 0.8
    with pytest.raises(TaskError, match="not in the task"):
        a.data_path("hospital-z")
    with pytest.raises(TaskError, match="no task at"):
        load_task(tmp_path / "nowhere")
    with pytest.raises(TaskError, match="invalid institution"):
        make_task(tmp_path / "c", ("../evil",))


def test_fused_expert_slices_restack_into_checkpoint_tensors() -> None:
    fused = torch.arange(24.0).reshape(3, 2, 4)
    wire_keys = {f"experts.w@{e}": fused[e : e + 1] for e in range(3)}
    state = _to_checkpoint_layout(wire_keys)
    assert torch.equal(state["experts.w"], fused)
    back = _from_checkpoint_layout(state, wire_keys)
    assert all(torch.equal(back[k], v) for k, v in wire_keys.items())
