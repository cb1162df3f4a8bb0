"""The glue around MLflow's scoring server (pricefuse.serving.server_guard), in-process.

A tiny pyfunc with the served model's signature stands in for the ensemble: what is checked here
is the request handling around any model — the bounded body reader, the formats, the turns, the
request context a model sees, and errors without stack traces. The same against a live server
of the real model: tests/integration/test_pipeline.py (test_bounded_server_*).
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from starlette.requests import Request

from pricefuse.serving import server_guard
from pricefuse.serving.limits import CURRENT_REQUEST, RequestLimits
from pricefuse.serving.model import model_signature
from tests.support import project_params

LIMITS = RequestLimits.from_config(
    project_params().serving,
    {"max_rows": 5, "max_body_bytes": 10_000, "light_rows": 2, "queue_seconds": 0.2},
)
JSON = "application/json"


class Tiny(mlflow.pyfunc.PythonModel):
    """Prices a row at its text's length; records the request context and can be held."""

    def load_context(self, context):
        self.seen: list = []
        self.hold = threading.Event()
        self.hold.set()

    def predict(self, context, model_input, params=None):
        self.seen.append(CURRENT_REQUEST.get())
        self.hold.wait(10)
        text = model_input["catalog_content"].astype(str)
        return pd.DataFrame({"price": text.str.len().astype(float)})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    mlflow.pyfunc.save_model(path, python_model=Tiny(), signature=model_signature(0.8))
    return mlflow.pyfunc.load_model(str(path))


@pytest.fixture(autouse=True)
def installed(monkeypatch: pytest.MonkeyPatch):
    """install() for the test, everything it replaced restored afterwards."""
    for name in ("limits", "lanes", "timeout", "original_invocations", "original_body"):
        monkeypatch.setattr(server_guard._Installed, name, getattr(server_guard._Installed, name))
    monkeypatch.setattr(scoring_server, "invocations", scoring_server.invocations)
    monkeypatch.setattr(Request, "body", Request.body)
    server_guard.install(LIMITS)
    assert scoring_server.invocations is server_guard.guarded_invocations


def call(model, body: bytes, content_type: str | None = JSON):
    """(status, parsed answer) of one call, as MLflow's endpoint would answer it."""
    schema = model.metadata.get_input_schema()
    try:
        result = scoring_server.invocations(body, content_type, model, schema)
    except MlflowException as exc:
        return exc.get_http_status_code(), json.loads(exc.serialize_as_json())
    if result.mimetype == JSON:
        return result.status, json.loads(result.response)
    return result.status, {"message": result.response}  # MLflow's plain-text 415


def split(*texts: str, extra: int = 0) -> bytes:
    columns = ["catalog_content"] + [f"x{i}" for i in range(extra)]
    data = [[text] + [0] * extra for text in texts]
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()


def test_every_format_is_priced_alike_and_the_model_sees_the_request(model):
    frame = pd.DataFrame({"sample_id": [1, 2], "catalog_content": ["tea", "olive oil"]})
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    bodies = [
        (split("tea", "olive oil", extra=50), JSON),  # the 50 made-up columns never reach it
        (frame.to_csv(index=False).encode(), "text/csv"),
        (parquet.getvalue(), "application/vnd.apache.parquet"),
    ]
    for body, media in bodies:
        status, answer = call(model, body, media)
        assert status == 200, answer
        assert [row["price"] for row in answer["predictions"]] == [3.0, 9.0], media
    contexts = model.unwrap_python_model().seen[-3:]
    assert all(c is not None and c.limits == LIMITS for c in contexts)
    assert all(0 < c.deadline.remaining() <= LIMITS.request_seconds for c in contexts)


@pytest.mark.parametrize(
    ("body", "media", "status", "words"),
    [
        (split(*["tea"] * 6), JSON, 413, "serving.max_rows"),
        (b"catalog_content\n" + b"tea\n" * 6, "text/csv", 413, "serving.max_rows"),
        (split("x" * 20_000), JSON, 413, "serving.max_body_bytes"),
        (b"[" * 5000 + b"]" * 5000, JSON, 400, "nested too deeply"),
        (b"[1, 2]", JSON, 400, "JSON dictionary"),  # MLflow's own message, without its trace
        (split("tea"), None, 415, "Content-Type"),
        (split("tea"), "application/json; charset=latin-1", 415, "UTF-8"),
        (b"catalog_content\ntea\n", "text/csv; charset=latin-1", 415, "UTF-8"),
    ],
)
def test_refusals_name_their_limit_without_a_stack_trace(model, body, media, status, words):
    answered, answer = call(model, body, media)
    assert answered == status and words in answer["message"], answer
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]


def test_a_large_request_waits_its_turn_and_a_small_one_does_not(model):
    tiny = model.unwrap_python_model()
    tiny.hold.clear()  # the first large request is held inside the model
    first: list = []
    heavy = threading.Thread(target=lambda: first.append(call(model, split(*["tea"] * 4))))
    heavy.start()
    while not tiny.seen or tiny.seen[-1] is None:
        time.sleep(0.01)
    try:
        started = time.monotonic()
        status, answer = call(model, split(*["oil"] * 3))  # another large one: no turn
        assert status == 503 and "serving.heavy_requests" in answer["message"], answer
        assert time.monotonic() - started < 2
        small = threading.Thread(target=lambda: first.append(call(model, split("rice"))))
        small.start()  # a small request goes straight to the model, beside the large one
        deadline = time.monotonic() + 5
        while len(tiny.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len([c for c in tiny.seen if c is not None]) >= 2
    finally:
        tiny.hold.set()
    heavy.join(10)
    small.join(10)
    assert sorted(status for status, _ in first) == [200, 200]


def _request(path: str, headers: dict[str, str], chunks: list[bytes]) -> Request:
    """A starlette request whose body arrives in `chunks`; `request.unread` holds the messages
    nobody received yet."""
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
        "server": ("127.0.0.1", 5000),
        "scheme": "http",
    }
    request = Request(scope, receive)
    request.unread = messages  # type: ignore[attr-defined]
    return request


def test_the_body_reader_refuses_before_holding_too_many_bytes():
    declared = _request("/invocations", {"content-length": "10001"}, [b"x"])
    with pytest.raises(server_guard.RequestRefused) as refused:
        asyncio.run(declared.body())
    assert refused.value.get_http_status_code() == 413
    assert declared.unread == []  # refused from the header, then dropped: the client sees it
    streamed = _request("/invocations", {}, [b"x" * 4000] * 5)  # chunked: counted as it comes
    with pytest.raises(server_guard.RequestRefused, match=r"serving\.max_body_bytes"):
        asyncio.run(streamed.body())
    assert streamed.unread == []  # read to its end and dropped, so the client sees the 413
    absurd = _request("/invocations", {"content-length": str(10**12)}, [b"x" * 4000] * 3)
    with pytest.raises(server_guard.RequestRefused):
        asyncio.run(absurd.body())
    assert len(absurd.unread) == 4  # far past the drain ceiling: never read
    fine = _request("/invocations", {"content-length": "6"}, [b"abc", b"def"])
    assert asyncio.run(fine.body()) == b"abcdef"
    other = _request("/ping", {}, [b"y" * 20_000])  # other paths read as before
    assert len(asyncio.run(other.body())) == 20_000
    with pytest.raises(server_guard.RequestRefused) as refused:
        asyncio.run(_request("/invocations", {"content-length": "ten"}, []).body())
    assert refused.value.get_http_status_code() == 400


def test_in_scoring_server_follows_mlflows_variable(monkeypatch):
    monkeypatch.delenv(scoring_server._SERVER_MODEL_PATH, raising=False)
    assert not server_guard.in_scoring_server()
    monkeypatch.setenv(scoring_server._SERVER_MODEL_PATH, str(Path("/models/x")))
    assert server_guard.in_scoring_server()
