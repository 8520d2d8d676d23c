"""Who a reply really comes from: SuperNodes as the SuperLink registered them.

A reply names its institution itself (from the SuperNode's node config), so on
its own that name is a claim. Under Flower's SuperNode authentication the
SuperLink knows each node's public key and the name the operator registered it
under (`flwr supernode register KEY.pub --name hospital-a`); the server side
takes the name from there, records the key's fingerprint in provenance, and
refuses a reply that claims to be someone else.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from param_server.federation.aggregate import UpdateRejectedError

logger = logging.getLogger(__name__)

MAX_NAME = 128


class _NodeInfo(Protocol):
    node_id: int
    name: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What the SuperLink vouches for about one SuperNode."""

    name: str
    """The name it was registered under; '' when registered without one."""
    key_fingerprint: str
    """`SHA256:...` of its public key, as `ssh-keygen -lf KEY.pub` prints it;
    '' without node authentication."""


def key_fingerprint(public_key: bytes) -> str:
    """The OpenSSH fingerprint of a public key the SuperLink stores (PEM), or
    of an OpenSSH public key line; '' when it is neither (the simulation
    engine gives its nodes random bytes)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        if public_key.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(public_key)
        else:
            key = serialization.load_ssh_public_key(public_key)
        line = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        logger.debug("not a public key we can read: %s", e)
        return ""
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=")
    return "SHA256:" + digest.decode()


def node_identities(nodes: Iterable[_NodeInfo]) -> dict[int, NodeIdentity]:
    """Node id -> identity, for the nodes the SuperLink has a name or key for
    (`grid.get_nodes()`; without node authentication there are none)."""
    out: dict[int, NodeIdentity] = {}
    for n in nodes:
        name = (n.name or "")[:MAX_NAME]
        fp = key_fingerprint(n.public_key) if n.public_key else ""
        if name or fp:
            out[int(n.node_id)] = NodeIdentity(name, fp)
    return out


def registered_name(ident: NodeIdentity | None, otherwise: str) -> str:
    """The name `ident` was registered under, else `otherwise`."""
    return ident.name if ident is not None and ident.name else otherwise


def verified_name(node_id: int, claimed: str, ident: NodeIdentity | None) -> str:
    """The institution to record for a reply that claims to be `claimed`.

    Raises:
        UpdateRejectedError: the node was registered under another name.
    """
    if ident is None or not ident.name:
        return claimed
    if claimed not in (ident.name, f"node-{node_id}"):
        raise UpdateRejectedError(
            f"the reply says it is {claimed!r} but node {node_id}'s key is "
            f"registered as {ident.name!r}; fix the SuperNode's --node-config "
            "institution or its registration"
        )
    return ident.name
