"""Load-path errors a client can act on, through a real neuron: missing weights are a 404
that names the model and what to do (never a server path), a local folder has one id
however it is spelled, ``devices`` is honoured or refused, a model too big for the host is a
400 (not a retryable 409/503), and a poisoned model can be evicted."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from helexa.core.errors import ApiError
from helexa.core.wire import ModelSpec
from helexa.neuron.harness.transformers.batched import PagedBackend
from helexa.neuron.model_files import canonical_model_id, hub_error
from helexa.neuron.service import Neuron
from helexa.up.tiny_model import (
    GGUF_Q8_0_FILENAME,
    write_tiny_model,
    write_tiny_model_to_hf_cache,
)
from tests.conftest import GGUF_REPO_ID, LOCAL_MODEL
from tests.support.inprocess import run_neuron, sse_frames
from tests.support.procs import Daemon, start_neuron

GGUF_FILE = f"gguf/{GGUF_Q8_0_FILENAME}"  # "gguf" is a folder holding only this GGUF
DIRECT_GGUF = "tiny-direct.Q8_0.gguf"  # a GGUF file straight in the model_dirs entry
MSGS = [{"role": "user", "content": "weather"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model_dirs folder of its own: the tiny dense model twice, and a GGUF file."""
    root = tmp_path_factory.mktemp("lifecycle-models")
    write_tiny_model(root / LOCAL_MODEL)
    write_tiny_model(root / "tiny-copy")
    snapshot = write_tiny_model_to_hf_cache(root.parent / "gguf-build", "helexa/q8", with_gguf=True)
    (root / "gguf").mkdir()
    shutil.copy(Path(snapshot) / GGUF_Q8_0_FILENAME, root / GGUF_FILE)
    shutil.copy(Path(snapshot) / GGUF_Q8_0_FILENAME, root / DIRECT_GGUF)
    return root


@pytest.fixture(scope="module")
def neuron(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, models: Path
) -> Iterator[tuple[Daemon, str]]:
    daemon, base = start_neuron(
        tmp_path_factory.mktemp("lifecycle"), f'model_dirs = ["{models}"]\n', hf_cache=hf_cache
    )
    yield daemon, base
    daemon.stop()


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=120)


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


def model_ids(base: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{base}/models").json()]


# --- missing weights --------------------------------------------------------------------------


def test_missing_weights_are_a_404_naming_the_model_and_the_fix(
    neuron: tuple[Daemon, str], hf_cache: Path, models: Path
) -> None:
    _daemon, base = neuron
    cases = [
        ({"model_id": "nobody/absent"}, "nobody/absent", "offline"),
        ({"model_id": "nobody/absent-GGUF", "quant": "Q4_K_M"}, "Q4_K_M", "offline"),
        ({"model_id": "no-such-folder"}, "no-such-folder", "model_dirs"),
        ({"model_id": "gguf/absent-Q8_0.gguf"}, "absent-Q8_0.gguf", "model_dirs"),
        ({"model_id": "absent.Q8_0.gguf"}, "absent.Q8_0.gguf", "model_dirs"),
        ({"model_id": GGUF_REPO_ID, "quant": "Q2_K"}, "Q2_K", "available"),
    ]
    for route in ("/models/load", "/models/size"):
        for spec, named, why in cases:
            error = error_of(post(base, route, spec), 404, "model_weights_not_found")
            message = error["message"]
            assert named in message and why in message, message
            for secret in (str(hf_cache), str(models), str(hf_cache.parent), "/tmp/"):
                assert secret not in message, message
            if why == "model_dirs":  # a local name: nothing to download
                assert "hf download" not in message and "huggingface-cli" not in message
        missing = error_of(
            post(base, route, {"model_id": "nobody/absent"}), 404, "model_weights_not_found"
        )
        assert "hf download nobody/absent" in missing["message"]
        assert "model_dirs" in missing["message"]
    assert model_ids(base) == []


class HttpError(OSError):
    """What the hub client raises for an HTTP status (only ``.response.status_code`` is read)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status)


def error_with_status(status: int) -> HttpError:
    return HttpError(status)


def unreachable(cause: BaseException | None) -> LocalEntryNotFoundError:
    error = LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (unreachable(ConnectionError("refused")), 404, "model_weights_not_found"),
        (unreachable(None), 404, "model_weights_not_found"),
        (unreachable(error_with_status(404)), 404, "model_weights_not_found"),
        (error_with_status(401), 404, "model_weights_not_found"),
        (unreachable(error_with_status(503)), 503, "weights_download_failed"),
        (unreachable(error_with_status(429)), 503, "weights_download_failed"),
        (error_with_status(502), 503, "weights_download_failed"),
        (OSError(errno.ENOSPC, "No space left on device: '/var/lib/neuron/hub/x'"), 507, None),
    ],
)
def test_what_a_failed_download_means(exc: BaseException, status: int, code: str | None) -> None:
    error = hub_error("org/model", None, exc)
    assert error.status == status
    if code is not None:
        assert error.code == code
    if status == 503:
        assert error.headers["Retry-After"]
    assert "/var/lib" not in error.message and "org/model" in error.message


# --- GGUFs as people lay them out --------------------------------------------------------------


def test_local_ggufs_load_on_llamacpp_without_naming_it(neuron: tuple[Daemon, str]) -> None:
    """A folder holding only a GGUF (no config.json) and a GGUF file straight in a model_dirs
    entry, named by its file name with or without ``.gguf``: all run on llama.cpp with no
    ``harness`` in the spec."""
    _daemon, base = neuron
    for spec, loaded_as in [
        ({"model_id": "gguf"}, "gguf"),
        ({"model_id": "tiny-direct.Q8_0"}, DIRECT_GGUF),
        ({"model_id": DIRECT_GGUF}, DIRECT_GGUF),
        ({"model_id": "gguf", "harness": "transformers"}, "gguf"),  # cortex's guess, corrected
    ]:
        size = post(base, "/models/size", spec)
        assert size.status_code == 200, size.text
        response = post(base, "/models/load", spec)
        assert response.status_code == 200, response.text
        status = {m["id"]: m for m in httpx.get(f"{base}/models").json()}[loaded_as]
        assert status["harness"] == "llamacpp", status
        answer = post(
            base,
            "/v1/chat/completions",
            {"model": loaded_as, "messages": MSGS, "max_tokens": 3, "temperature": 0},
        )
        assert answer.status_code == 200, answer.text
        assert post(base, "/models/unload", {"model_id": loaded_as}).status_code == 200
    assert model_ids(base) == []


def test_local_gguf_lookup(models: Path) -> None:
    from helexa.neuron.model_files import gguf_only_folder, resolve_local_gguf

    dirs = [models]
    assert resolve_local_gguf("tiny-direct.Q8_0", dirs) == (models.resolve(), DIRECT_GGUF)
    assert resolve_local_gguf(GGUF_FILE, dirs) == ((models / "gguf").resolve(), GGUF_Q8_0_FILENAME)
    for outside in ("../tiny-direct.Q8_0", "/etc/passwd", "gguf", "", "x\x00.gguf"):
        assert resolve_local_gguf(outside, dirs) is None, outside
    assert resolve_local_gguf(DIRECT_GGUF, []) is None
    assert resolve_local_gguf("a" * 300, dirs) is None  # too long a name: not a model
    (models / f"{LOCAL_MODEL}.gguf").write_bytes(b"GGUF")  # beside the folder of that name
    try:
        assert resolve_local_gguf(LOCAL_MODEL, dirs) is None  # the folder comes first
        assert not gguf_only_folder(LOCAL_MODEL, dirs)
        assert resolve_local_gguf(f"{LOCAL_MODEL}.gguf", dirs) is not None
    finally:
        (models / f"{LOCAL_MODEL}.gguf").unlink()
    assert not gguf_only_folder("a" * 300, dirs)
    assert gguf_only_folder("gguf", dirs) and gguf_only_folder("tiny-direct.Q8_0", dirs)
    assert not gguf_only_folder(LOCAL_MODEL, dirs) and not gguf_only_folder("absent", dirs)


# --- one id per local folder -------------------------------------------------------------------


def test_canonical_ids(models: Path) -> None:
    dirs = [models]
    for spelling in (
        LOCAL_MODEL,
        f"./{LOCAL_MODEL}",
        f"{LOCAL_MODEL}/.",
        f"{LOCAL_MODEL}//",
        f"{LOCAL_MODEL}/../{LOCAL_MODEL}",
        str(models / LOCAL_MODEL),
        f"{models}//{LOCAL_MODEL}/",
    ):
        assert canonical_model_id(spelling, dirs) == LOCAL_MODEL, spelling
    assert canonical_model_id(f"./{GGUF_FILE}", dirs) == GGUF_FILE
    for spelling in (
        DIRECT_GGUF,
        DIRECT_GGUF.removesuffix(".gguf"),
        f"./{DIRECT_GGUF}",
        str(models / DIRECT_GGUF),
    ):
        assert canonical_model_id(spelling, dirs) == DIRECT_GGUF, spelling
    assert canonical_model_id(str(models / GGUF_FILE), dirs) == GGUF_FILE
    for kept in ("Qwen/Qwen3-0.6B", "no-such-folder", "../../etc", "/etc"):
        assert canonical_model_id(kept, dirs) == kept
    assert canonical_model_id(f"./{LOCAL_MODEL}", []) == f"./{LOCAL_MODEL}"


def test_every_spelling_of_a_local_folder_loads_once(
    neuron: tuple[Daemon, str], models: Path
) -> None:
    daemon, base = neuron

    def loads() -> list[str]:
        return [
            line
            for line in daemon.log().splitlines()
            if "msg=load " in line and f"model_id={LOCAL_MODEL} " in line
        ]

    before = len(loads())
    spellings = [
        LOCAL_MODEL,
        f"./{LOCAL_MODEL}",
        f"{LOCAL_MODEL}/.",
        f"{LOCAL_MODEL}//",
        str(models / LOCAL_MODEL),
        f"{LOCAL_MODEL}/../{LOCAL_MODEL}",
    ]
    with concurrent.futures.ThreadPoolExecutor(len(spellings)) as pool:
        replies = list(pool.map(lambda s: post(base, "/models/load", {"model_id": s}), spellings))
    assert [r.status_code for r in replies] == [200] * len(spellings), [r.text for r in replies]
    assert {r.json()["model"]["id"] for r in replies} == {LOCAL_MODEL}
    assert len(loads()) == before + 1, loads()
    assert model_ids(base) == [LOCAL_MODEL]

    for spelling in spellings[1:-1]:  # a request's model may not hold '..' (wire limits)
        answer = post(
            base,
            "/v1/chat/completions",
            {"model": spelling, "messages": MSGS, "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == LOCAL_MODEL
    endpoint = httpx.get(f"{base}/models/{LOCAL_MODEL}%2F./endpoint")
    assert endpoint.status_code == 200, endpoint.text
    again = post(base, "/models/load", {"model_id": f"./{LOCAL_MODEL}"})
    assert again.json()["status"] == "already_loaded"

    gone = post(base, "/models/unload", {"model_id": str(models / LOCAL_MODEL)})
    assert gone.status_code == 200, gone.text
    assert model_ids(base) == []


# --- devices ---------------------------------------------------------------------------------


def test_devices_are_honoured_or_refused(neuron: tuple[Daemon, str]) -> None:
    _daemon, base = neuron
    assert httpx.get(f"{base}/discovery").json()["devices"] == []  # a CPU-only host
    for spec in (
        {"model_id": LOCAL_MODEL, "devices": [5]},
        {"model_id": LOCAL_MODEL, "devices": [0]},
        {"model_id": GGUF_FILE, "devices": [5]},
        {"model_id": GGUF_REPO_ID, "quant": "Q8_0", "devices": [1]},
    ):
        error = error_of(post(base, "/models/load", spec), 400, "no_such_device")
        assert error["param"] == "devices"
    assert model_ids(base) == []

    for model_id in (LOCAL_MODEL, GGUF_FILE):
        loaded = post(base, "/models/load", {"model_id": model_id, "devices": []})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model"]["devices"] == []
        answer = post(
            base, "/v1/chat/completions", {"model": model_id, "messages": MSGS, "max_tokens": 2}
        )
        assert answer.status_code == 200, answer.text
        assert post(base, "/models/unload", {"model_id": model_id}).status_code == 200


# --- memory: never (400) versus not now (409) ------------------------------------------------


@pytest.mark.parametrize("model_id", [LOCAL_MODEL, GGUF_FILE])
def test_too_big_ever_is_400_too_big_now_is_409(models: Path, model_id: str) -> None:
    probe: dict[str, int] = {}

    async def size(neuron: Neuron, client: httpx.AsyncClient) -> None:
        probe["bytes"] = (await neuron.size(ModelSpec(model_id=model_id))).bytes

    run_neuron({"model_dirs": [models]}, None, size)
    need_mb = probe["bytes"] // (1024 * 1024) + 1

    async def too_small(neuron: Neuron, client: httpx.AsyncClient) -> None:
        reply = await client.post("/models/load", json={"model_id": model_id})
        error = error_of(reply, 400, "model_too_large")
        assert "[cpu] memory_mb" in error["message"]
        assert (await client.get("/models")).json() == []

    small = {"model_dirs": [models], "cpu": {"memory_mb": max(need_mb // 2, 1)}}
    run_neuron(small, None, too_small)

    async def one_fits(neuron: Neuron, client: httpx.AsyncClient) -> None:
        first = await client.post("/models/load", json={"model_id": model_id})
        assert first.status_code == 200, first.text
        if model_id == LOCAL_MODEL:  # a second copy would fit alone, not beside the first
            second = await client.post("/models/load", json={"model_id": "tiny-copy"})
            error_of(second, 409, "insufficient_memory")

    room_for_one = {"model_dirs": [models], "cpu": {"memory_mb": need_mb + need_mb // 2}}
    run_neuron(room_for_one, None, one_fits)


# --- a poisoned model can be evicted ----------------------------------------------------------


def test_a_poisoned_model_unloads_and_frees_its_memory(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fault(self: PagedBackend, chunks):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        for model_id in (LOCAL_MODEL, GGUF_FILE):
            loaded = await client.post("/models/load", json={"model_id": model_id})
            assert loaded.status_code == 200, loaded.text
        assert neuron.health().cpu.memory_used_mb > 0
        monkeypatch.setattr(PagedBackend, "_forward", fault)
        body = {"model": LOCAL_MODEL, "messages": MSGS, "max_tokens": 4, "stream": True}
        frames = sse_frames((await client.post("/v1/chat/completions", json=body)).text)
        assert json.loads(frames[-1])["error"]["code"] == "device_poisoned"
        statuses = {m["id"]: m["status"] for m in (await client.get("/models")).json()}
        assert statuses == {LOCAL_MODEL: "poisoned", GGUF_FILE: "poisoned"}  # one cpu worker
        for model_id in (f"./{LOCAL_MODEL}", GGUF_FILE):
            gone = await client.post("/models/unload", json={"model_id": model_id})
            assert gone.status_code == 200, gone.text
        assert (await client.get("/models")).json() == []
        health = (await client.get("/health")).json()
        assert health["cpu"]["memory_used_mb"] == 0 and health["models"] == {}
        again = await client.post("/models/unload", json={"model_id": LOCAL_MODEL})
        error_of(again, 404, "model_not_found")

    run_neuron({"model_dirs": [models]}, None, scenario)


def test_api_error_details_stay_out_of_paths() -> None:
    # The 403 for a path outside model_dirs repeats the caller's own spelling, nothing more.
    from helexa.neuron.model_files import resolve_local_dir

    with pytest.raises(ApiError) as info:
        resolve_local_dir("../../etc", [Path("/srv/models")])
    assert info.value.status == 403 and "/srv/models" not in info.value.message


def test_loads_are_refused_once_draining(models: Path) -> None:
    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        two = await client.post("/models/load", json={"model_id": LOCAL_MODEL, "devices": [0, 1]})
        error_of(two, 400, "unsupported_placement")
        neuron.begin_drain()
        refused = await client.post("/models/load", json={"model_id": LOCAL_MODEL})
        error_of(refused, 503, "shutting_down")
        assert refused.headers["retry-after"]

    run_neuron({"model_dirs": [models], "drain_timeout_s": 30}, None, scenario)
