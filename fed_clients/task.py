"""A small, real learning task split non-IID across institutions.

Each institution holds token sequences ("documents") from a few of several
domains; a domain is a sparse first-order Markov chain over a shared
vocabulary, and every document starts with its domain's tag token. An
institution sees mostly its own domains (`own_share`), so a model trained on
one institution's data alone predicts the others' poorly, while the union of
all of them covers every domain. Each institution has a held-out split drawn
the same way as its training split.

Files: `<root>/task.json` and `<root>/<institution>/data.safetensors`
(`train` and `test`, int64 [documents, seq_len]).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from param_server.core.errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_INSTITUTIONS = ("hospital-a", "hospital-b", "hospital-c")
_INSTITUTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TaskError(InvalidInputError):
    """The task folder or an institution's data is missing or malformed (an
    InvalidInputError, so also a ValueError)."""


@dataclass(frozen=True, slots=True)
class Task:
    """What `make_task` wrote: enough to build a matching model and find data."""

    root: str
    institutions: tuple[str, ...]
    vocab_size: int
    seq_len: int
    domains: int
    train_docs: int
    test_docs: int
    own_share: float
    seed: int
    data_files: dict[str, str] | None = None
    """Institution -> its own text file, relative to `root` (a task of real
    text; then `vocab_size` is the tokenizer's), instead of generated ids."""
    options: dict[str, str] | None = None
    """Node config every institution of the task gets (seq-len, text-field...)."""

    def data_path(self, institution: str) -> Path:
        if institution not in self.institutions:
            raise TaskError(
                f"institution {institution!r} is not in the task at {self.root} "
                f"(have: {', '.join(self.institutions)})"
            )
        if self.data_files is not None:
            return Path(self.root) / self.data_files[institution]
        return Path(self.root) / institution / "data.safetensors"

    def save(self) -> None:
        """Writes `task.json` (what `load_task` reads)."""
        (Path(self.root) / "task.json").write_text(json.dumps(asdict(self), indent=1))


def check_institution(name: str) -> str:
    if not _INSTITUTION_RE.fullmatch(name) or ".." in name:
        raise TaskError(
            f"invalid institution name {name!r}: use 1-64 letters, digits, '.', "
            "'_' or '-' (e.g. 'hospital-a')"
        )
    return name


def _domain_chains(
    domains: int, vocab: int, successors: int, g: torch.Generator
) -> torch.Tensor:
    """[domains, vocab, vocab] row-stochastic transition matrices, sparse rows."""
    p = torch.zeros(domains, vocab, vocab)
    for d in range(domains):
        for v in range(domains, vocab):
            nxt = domains + torch.randperm(vocab - domains, generator=g)[:successors]
            w = torch.rand(successors, generator=g) + 0.2
            p[d, v, nxt] = w / w.sum()
    return p


def _sample(
    chains: torch.Tensor, domain_ids: torch.Tensor, seq_len: int, g: torch.Generator
) -> torch.Tensor:
    n = len(domain_ids)
    domains, vocab, _ = chains.shape
    out = torch.empty(n, seq_len, dtype=torch.int64)
    out[:, 0] = domain_ids
    out[:, 1] = domains + torch.randint(0, vocab - domains, (n,), generator=g)
    for i in range(2, seq_len):
        rows = chains[domain_ids, out[:, i - 1]]
        out[:, i] = torch.multinomial(rows, 1, generator=g).squeeze(1)
    return out


def make_task(
    root: str | os.PathLike[str],
    institutions: tuple[str, ...] = DEFAULT_INSTITUTIONS,
    *,
    vocab_size: int = 64,
    seq_len: int = 32,
    domains_per_institution: int = 2,
    successors: int = 3,
    train_docs: int = 384,
    test_docs: int = 128,
    own_share: float = 0.9,
    seed: int = 0,
) -> Task:
    """Generates the task under `root` (deterministic for a seed) and returns it."""
    for name in institutions:
        check_institution(name)
    if len(set(institutions)) != len(institutions) or len(institutions) < 1:
        raise TaskError("institution names must be distinct and at least one given")
    if not 0 < own_share <= 1:
        raise TaskError("own_share must be in (0, 1]")
    domains = domains_per_institution * len(institutions)
    if vocab_size < domains + successors + 1:
        raise TaskError(f"vocab_size {vocab_size} too small for {domains} domains")
    g = torch.Generator().manual_seed(seed)
    chains = _domain_chains(domains, vocab_size, successors, g)
    root = Path(root)
    for i, name in enumerate(institutions):
        own = list(
            range(i * domains_per_institution, (i + 1) * domains_per_institution)
        )
        others = [d for d in range(domains) if d not in own]
        mix = torch.zeros(domains)
        share = own_share if others else 1.0
        mix[own] = share / len(own)
        if others:
            mix[others] = (1 - share) / len(others)
        splits = {}
        for split, n in (("train", train_docs), ("test", test_docs)):
            ids = torch.multinomial(mix, n, replacement=True, generator=g)
            splits[split] = _sample(chains, ids, seq_len, g)
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file(splits, root / name / "data.safetensors")
    task = Task(
        str(root),
        tuple(institutions),
        vocab_size,
        seq_len,
        domains,
        train_docs,
        test_docs,
        own_share,
        seed,
    )
    task.save()
    logger.info("wrote a %d-institution task to %s", len(institutions), root)
    return task


def load_task(root: str | os.PathLike[str]) -> Task:
    path = Path(root) / "task.json"
    try:
        doc = json.loads(path.read_text())
        doc["institutions"] = tuple(doc["institutions"])
        doc["root"] = str(Path(root))
        return Task(**doc)
    except FileNotFoundError:
        raise TaskError(
            f"no task at {root}: {path} is missing; generate one with "
            "`param-server fed-data DIR`"
        ) from None
    except (ValueError, TypeError, KeyError) as e:
        raise TaskError(f"{path} is malformed: {e}") from e


def load_split(path: str | os.PathLike[str], split: str) -> torch.Tensor:
    """An institution's `train` or `test` documents, int64 [n, seq_len]."""
    try:
        data = load_file(os.fspath(path))
    except FileNotFoundError:
        raise TaskError(
            f"no data at {path}; check data-path in --node-config"
        ) from None
    except (SafetensorError, OSError) as e:
        raise TaskError(f"cannot read {path}: {e}") from e
    t = data.get(split)
    if t is None or t.dtype != torch.int64 or t.dim() != 2 or len(t) == 0:
        raise TaskError(f"{path} has no usable {split!r} split (int64 [n, seq_len])")
    return t


def model_config(
    task: Task,
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 4,
    dtype: str = "float32",
) -> dict[str, object]:
    """config.json of a tiny Mixtral sized for the task."""
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": task.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "max_position_embeddings": max(64, task.seq_len),
        "tie_word_embeddings": False,
        "dtype": dtype,
    }


def write_initial_checkpoint(
    task: Task,
    dest: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    seed: int = 0,
    **sizes: int,
) -> Path:
    """A freshly initialised tiny MoE for the task, saved as a Hugging Face folder
    ready for `param-server import`. `sizes`: hidden, layers, experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(
        json.dumps(model_config(task, dtype=dtype, **sizes))
    )
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(dest)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))  # type: ignore[no-untyped-call]
    model.save_pretrained(dest)
    return dest
