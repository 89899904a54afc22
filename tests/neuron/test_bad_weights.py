"""Empty, truncated and foreign weight files: a 422 ``model_weights_invalid`` naming the file
and what is wrong (never a 500 with a library's error text), on both harnesses, and the
neuron goes on serving."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helexa.neuron.weights_check import check_gguf, check_safetensors
from helexa.up.tiny_model import GGUF_F16_FILENAME, write_tiny_model, write_tiny_model_to_hf_cache
from tests.support.procs import start_neuron

# model id → (the file to break, how)
BROKEN = {
    "garbage-GGUF": ("x.Q8_0.gguf", "garbage"),
    "empty-GGUF": ("x.Q8_0.gguf", "empty"),
    "trunc-GGUF": ("x.Q8_0.gguf", "half"),
    "dense-garbage": ("model.safetensors", "garbage"),
    "dense-empty": ("model.safetensors", "empty"),
    "dense-trunc": ("model.safetensors", "half"),
}
EXPECTED = {
    "garbage-GGUF": "not a GGUF file",
    "empty-GGUF": "it is empty or truncated (0 bytes)",
    "trunc-GGUF": "it is truncated or corrupt",
    "dense-garbage": "not a safetensors file",
    "dense-empty": "it is empty or truncated (0 bytes)",
    "dense-trunc": "it is truncated (",
}


def break_file(good: Path, dest: Path, how: str) -> None:
    data = good.read_bytes()
    if how == "garbage":
        dest.write_bytes(os.urandom(4096))
    elif how == "empty":
        dest.write_bytes(b"")
    else:
        dest.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("broken")
    dense = write_tiny_model(work / "good-dense")
    gguf = write_tiny_model_to_hf_cache(work / "hub", "helexa/bad-src", with_gguf=True)
    models = work / "models"
    for model_id, (name, how) in BROKEN.items():
        folder = models / model_id
        if model_id.endswith("GGUF"):
            folder.mkdir(parents=True)
            break_file(Path(gguf) / GGUF_F16_FILENAME, folder / name, how)
        else:
            shutil.copytree(dense, folder)
            break_file(dense / name, folder / name, how)
    shutil.copytree(dense, models / "dense-good")
    daemon, base = start_neuron(work, f'model_dirs = ["{models}"]\n', hf_cache=hf_cache)
    yield base, models
    daemon.stop()


@pytest.mark.parametrize("model_id", list(BROKEN))
def test_broken_weights_are_a_422_naming_the_file(broken: tuple[str, Path], model_id: str) -> None:
    base, _models = broken
    response = httpx.post(f"{base}/models/load", json={"model_id": model_id}, timeout=120)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_weights_invalid" and error["param"] == "model_id"
    name = BROKEN[model_id][0]
    assert f"the weights file {name} cannot be used: {EXPECTED[model_id]}" in error["message"]
    assert "/" not in error["message"].split(name)[0]  # no server paths
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200


def test_the_neuron_still_loads_good_weights(broken: tuple[str, Path]) -> None:
    base, _models = broken
    response = httpx.post(f"{base}/models/load", json={"model_id": "dense-good"}, timeout=120)
    assert response.status_code == 200, response.text


def test_checks_pass_the_good_files(broken: tuple[str, Path]) -> None:
    _base, models = broken
    header = check_safetensors(models / "dense-good" / "model.safetensors")
    assert any(name != "__metadata__" for name in header)
    snapshot = next((models.parent / "hub").rglob(GGUF_F16_FILENAME))
    check_gguf(snapshot)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "data_offsets": [0, 4]},  # no shape
        {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, -4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]},
        [1, 2],
    ],
)
def test_malformed_safetensors_entries_are_named(tmp_path: Path, entry: object) -> None:
    import json
    import struct

    from helexa.core.errors import ApiError

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ApiError) as info:
        check_safetensors(path)
    assert info.value.status == 422 and "a malformed entry for 'w'" in info.value.message
    nested = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(ApiError) as info:
        check_safetensors(path)
    assert "unreadable header" in info.value.message
