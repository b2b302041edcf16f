"""A local model directory with missing or cut-short safetensors is refused at start-up by name,
checked against the index file, before any loading begins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmvision.backends.local.loading import INDEX, check_source, weight_problems
from glmvision.core.config import ConfigError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """The demo model saved by transformers in several shards, with its index (as the hub ships)."""
    import transformers

    directory = tmp_path_factory.mktemp("sharded")
    model = transformers.AutoModelForImageTextToText.from_pretrained(demo_model_dir)
    model.save_pretrained(directory, max_shard_size="200KB")  # config.json and the index too
    return directory


def copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(directory, target)
    return target


def shards(directory: Path) -> list[str]:
    return sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))


def test_whole_models_pass(sharded: Path, demo_model_dir: Path) -> None:
    assert len(shards(sharded)) >= 3  # really sharded
    assert weight_problems(sharded) == []
    assert weight_problems(demo_model_dir) == []
    check_source(str(sharded))


def test_missing_shards_are_named(sharded: Path, tmp_path: Path) -> None:
    model = copy(sharded, tmp_path)
    gone = shards(model)[1:3]
    for name in gone:
        (model / name).unlink()
    with pytest.raises(ConfigError) as caught:
        check_source(str(model))
    message = str(caught.value)
    assert message.startswith(f"GLMVISION_MODEL={model}: missing ")
    assert all(name in message for name in gone)
    assert f"(2 of {len(shards(model))} shards)" in message
    assert "\n" not in message  # one line, as gunicorn prints it


def test_a_truncated_shard_is_named(sharded: Path, tmp_path: Path) -> None:
    model = copy(sharded, tmp_path)
    victim = model / shards(model)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    assert weight_problems(model) == [f"truncated or corrupt: {victim.name}"]
    victim.write_bytes(data[:4])  # not even the header's length
    assert weight_problems(model) == [f"truncated or corrupt: {victim.name}"]
    victim.write_bytes(data)
    assert weight_problems(model) == []


def test_a_single_file_model_is_checked_too(demo_model_dir: Path, tmp_path: Path) -> None:
    model = copy(demo_model_dir, tmp_path)
    (weights,) = model.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1])
    assert weight_problems(model) == [f"truncated or corrupt: {weights.name}"]


def test_a_broken_index_is_refused(sharded: Path, tmp_path: Path) -> None:
    model = copy(sharded, tmp_path)
    (model / INDEX).write_text("{not json")
    assert weight_problems(model) == [f"{INDEX} is not a safetensors index"]
    (model / INDEX).write_text('{"weight_map": 3}')
    assert weight_problems(model) == [f"{INDEX} is not a safetensors index"]


def test_a_directory_without_weights_is_left_to_loading(tmp_path: Path) -> None:
    assert weight_problems(tmp_path) == []  # it fails there, with 503 model_unavailable, and retries
