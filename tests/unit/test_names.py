from __future__ import annotations

import pytest

from param_server.core.errors import InvalidInputError
from param_server.core.names import check_file_name, check_model_name, check_shard_key


@pytest.mark.parametrize("name", ["mixtral-8x7b", "a", "Qwen3.MoE_v1", "0abc"])
def test_valid_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../etc",
        "a/b",
        "a\\b",
        "..",
        "a..b",
        ".hidden",
        "-x",
        "a b",
        "x" * 129,
        "é",
        "a\x00b",
    ],
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid model name"):
        check_model_name(name)


@pytest.mark.parametrize("key", ["layers.0.experts.3", "global", "layers.12.dense"])
def test_valid_shard_keys(key: str) -> None:
    assert check_shard_key(key) == key


@pytest.mark.parametrize("key", ["../../x", "/abs", "layers/0", "..", "k\n"])
def test_invalid_shard_keys(key: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid shard key"):
        check_shard_key(key)


def test_file_names_reject_directories() -> None:
    assert check_file_name("config.json") == "config.json"
    with pytest.raises(InvalidInputError):
        check_file_name("sub/config.json")


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="must be a string"):
        check_model_name(3)
