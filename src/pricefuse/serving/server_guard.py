"""Bounds on `mlflow models serve`'s request handling, installed by the served model as it loads.

Why the model reaches into the server: `mlflow models serve` reads a whole body into memory,
parses it into a DataFrame and only then calls the model, with one thread per request from a
pool of a few. So a limit the model checks is too late for bytes, and a request the server gave
up on (its 504) goes on working. MLflow offers no hook for either; its scoring server loads the
model inside the event loop, before it serves, in the same process — so the model, when it finds
itself there (`in_scoring_server`), installs three things (`install`, once per process):

1. `starlette.requests.Request.body` for `/invocations` refuses a body over
   `serving.max_body_bytes` (413) from its Content-Length before reading it, or as soon as the
   streamed bytes pass the limit, and notes when the request arrived (the deadline's start);
2. `mlflow.pyfunc.scoring_server.invocations` is wrapped (`guarded_invocations`): rows are
   counted per format before the DataFrame is built (JSON's four shapes, CSV and Parquet, these
   two parsed here as text: MLflow's CSV path fails on the signature's `sample_id`), the request
   takes its turn (`WorkLanes`: small ones never wait), and runs with its `RequestContext` so the
   model checks the deadline and the pixel budget. Refusals and MLflow's own errors become JSON
   errors without a stack trace; a failure nobody foresaw is a 500 whose trace stays in the log;
3. the event loop's default executor (where MLflow runs each request) gets
   `serving.request_threads` threads, so requests waiting on image links or their turn do not
   starve the small ones of a thread.

Everything here is glue; the rules themselves are in pricefuse.serving.limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    BAD_REQUEST,
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    RESOURCE_EXHAUSTED,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)

from pricefuse.serving.limits import (
    CURRENT_REQUEST,
    REQUEST_ARRIVED,
    Deadline,
    Refusal,
    RequestContext,
    RequestLimits,
    WorkLanes,
    cut_message,
    decode_json_body,
    json_rows,
    read_csv_body,
    read_parquet_body,
    request_columns_only,
)

log = logging.getLogger(__name__)

INVOCATIONS_PATH = "/invocations"
# A body refused for its size is still read (and dropped) up to this many times the limit, so
# the client sees the 413 (see `_drain`).
DRAIN_FACTOR = 4
MEDIA_JSON = "application/json"
MEDIA_CSV = "text/csv"
MEDIA_PARQUET = "application/vnd.apache.parquet"
# Seconds kept between our deadline and MLflow's request timeout, so the model's own 504 (which
# names the limit) is what the client sees, not MLflow's bare one.
TIMEOUT_MARGIN = 1.0
_ERROR_CODES = {
    400: BAD_REQUEST,
    413: RESOURCE_EXHAUSTED,
    415: BAD_REQUEST,
    503: TEMPORARILY_UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


class RequestRefused(MlflowException):
    """A `Refusal` as MLflow's JSON error, with its own HTTP status (MLflow's error codes have
    no 413 or 415)."""

    def __init__(self, refusal: Refusal) -> None:
        code = _ERROR_CODES.get(refusal.status, BAD_REQUEST)
        super().__init__(cut_message(refusal.message), error_code=code)
        self.status = refusal.status

    def get_http_status_code(self) -> int:
        return self.status


class _Installed:
    """The process's installed state: one set of limits and lanes, whatever loads the model."""

    lock = threading.Lock()
    limits: RequestLimits | None = None
    lanes: WorkLanes | None = None
    timeout: float = 60.0
    original_invocations: Any = None
    original_body: Any = None


def in_scoring_server() -> bool:
    """Whether this process is MLflow's scoring server (it names the model in this variable)."""
    from mlflow.pyfunc import scoring_server

    return scoring_server._SERVER_MODEL_PATH in os.environ


def install(limits: RequestLimits) -> None:
    """Bound this scoring-server process's request handling by `limits` (module docstring).

    Idempotent: a second model loaded into the process replaces the limits, not the hooks.
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server
    from starlette.requests import Request

    with _Installed.lock:
        _Installed.limits = limits
        _Installed.lanes = WorkLanes(limits.heavy_requests)
        _Installed.timeout = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
        if _Installed.original_invocations is None:
            _Installed.original_invocations = scoring_server.invocations
            _Installed.original_body = Request.body
            scoring_server.invocations = guarded_invocations
            Request.body = _bounded_body
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None  # loaded outside the server's loop (a test): the default executor stays
    if loop is not None:
        loop.set_default_executor(
            ThreadPoolExecutor(limits.request_threads, thread_name_prefix="pricefuse-request")
        )
    log.info("serving limits installed: %s", limits)


def request_deadline(limits: RequestLimits, arrived: float | None) -> Deadline:
    """`serving.request_seconds` from the request's arrival, and never past MLflow's timeout."""
    seconds = min(limits.request_seconds, max(_Installed.timeout - TIMEOUT_MARGIN, 1.0))
    return Deadline(seconds, start=arrived)


async def _bounded_body(self: Any) -> bytes:
    """Starlette's `Request.body` for /invocations, refusing a body over the limit before it is
    held (see the module docstring); other paths read as before."""
    limits = _Installed.limits
    if limits is None or self.url.path != INVOCATIONS_PATH:
        return await _Installed.original_body(self)
    if hasattr(self, "_body"):
        return self._body
    REQUEST_ARRIVED.set(time.monotonic())
    chunks: list[bytes] = []
    size = 0
    try:
        declared = self.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise Refusal(400, f"Content-Length {declared[:40]!r} is not a byte count")
            limits.check_body(int(declared))
        async for chunk in self.stream():
            size += len(chunk)
            limits.check_body(size)
            chunks.append(chunk)
    except Refusal as refusal:
        chunks.clear()
        if refusal.status == 413 and _declared_at_most(self, DRAIN_FACTOR * limits.max_body_bytes):
            await _drain(self, size, DRAIN_FACTOR * limits.max_body_bytes)
        raise RequestRefused(refusal) from None
    self._body = b"".join(chunks)
    return self._body


def _declared_at_most(request: Any, ceiling: int) -> bool:
    """Whether the body is chunked or declares at most `ceiling` bytes."""
    declared = request.headers.get("content-length")
    return declared is None or (declared.strip().isdigit() and int(declared) <= ceiling)


async def _drain(request: Any, received: int, ceiling: int) -> None:
    """Read and drop the rest of a refused body, up to `ceiling` bytes in all.

    Why: most HTTP clients (Python's requests and urllib among them) send the whole body before
    reading the answer, so a server that answers 413 and closes mid-body leaves them with a
    broken pipe instead of the 413. Dropped bytes cost no memory; a body declared larger than
    the ceiling is not read at all (the connection closes).
    """
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            received += len(chunk)
            if received > ceiling:
                return


def _media(content_type: str | None) -> tuple[str, dict[str, str]]:
    """The media type and its parameters; a missing Content-Type is a 415 naming the types."""
    if not content_type or not content_type.strip():
        raise Refusal(
            415,
            f"the request has no Content-Type: send {MEDIA_JSON}, {MEDIA_CSV} or {MEDIA_PARQUET}",
        )
    media, *parameters = (part.strip() for part in content_type.split(";"))
    values = {
        key.strip().lower(): value.strip()
        for key, _, value in (p.partition("=") for p in parameters)
    }
    return media.lower(), values


def _check_charset(parameters: dict[str, str]) -> None:
    """MLflow's rule for its JSON path, applied to the formats parsed here."""
    if parameters.get("charset", "utf-8").lower() != "utf-8":
        raise Refusal(415, "The scoring server only supports UTF-8")
    unknown = set(parameters) - {"charset"}
    if unknown:
        raise Refusal(415, f"Unrecognized content type parameters: {', '.join(sorted(unknown))}")


def guarded_invocations(
    data: bytes, content_type: str | None, model: Any, input_schema: Any
) -> Any:
    """MLflow's `invocations`, bounded (module docstring, point 2); runs in a request thread."""
    limits = _Installed.limits
    original = _Installed.original_invocations
    lanes = _Installed.lanes
    assert limits is not None and lanes is not None  # install() ran before any request
    deadline = request_deadline(limits, REQUEST_ARRIVED.get())
    try:
        limits.check_body(len(data))
        media, parameters = _media(content_type)
        if media not in (MEDIA_JSON, MEDIA_CSV, MEDIA_PARQUET):
            return original(data, content_type, model, input_schema)  # MLflow's 415
        light = limits.is_light(0, len(data))
        frame = payload = None
        with lanes.turn(light, min(limits.queue_seconds, deadline.remaining())):
            if media == MEDIA_JSON:
                payload = request_columns_only(decode_json_body(data))
                rows = json_rows(payload)
            else:
                _check_charset(parameters)
                reader = read_csv_body if media == MEDIA_CSV else read_parquet_body
                frame = reader(data, limits)
                rows = len(frame)
            limits.check_rows(rows)
            # a small body of many rows (short texts) takes its turn now, to be priced
            needs_turn = light and not limits.is_light(rows, len(data))
            with lanes.turn(not needs_turn, min(limits.queue_seconds, deadline.remaining())):
                return _priced(
                    data, payload, frame, content_type, model, input_schema, limits, deadline
                )
    except Refusal as refusal:
        raise RequestRefused(refusal) from None
    except RequestRefused as refused:  # from the model (its deadline), through MLflow's path
        refused.message = _client_message(refused.message)
        raise
    except MlflowException as exc:  # MLflow's own 4xx: kept, without the stack trace
        raise MlflowException(
            _client_message(exc.message), error_code=ErrorCode.Value(exc.error_code)
        ) from None
    except Exception:
        log.exception("unexpected error while pricing a request")
        raise MlflowException(
            "the model failed on this request (the server's log has the details)",
            error_code=INTERNAL_ERROR,
        ) from None


def _client_message(message: str) -> str:
    """The part of an error a client needs, short: MLflow prefixes a model's error with the
    whole input's repr ("Failed to predict data '...'. Error: ..."), which is dropped."""
    head, separator, tail = message.partition("'. \nError: ")
    if separator and head.startswith("Failed to predict data '"):
        message = tail
    return cut_message(message)


def _priced(
    raw: bytes,
    payload: Any,
    frame: Any,
    content_type: str | None,
    model: Any,
    input_schema: Any,
    limits: RequestLimits,
    deadline: Deadline,
) -> Any:
    """Price a parsed request with its context set: JSON through MLflow's own path (its request
    shapes and params), CSV and Parquet frames straight to the model, answered as MLflow would."""
    from mlflow.pyfunc import scoring_server

    deadline.check("waiting for its turn")
    token = CURRENT_REQUEST.set(RequestContext(limits, deadline))
    try:
        if frame is None:
            # a dict goes on parsed; anything else (a JSON list, a number) as the bytes, for
            # MLflow's own 400 naming the shape it expects
            body = payload if isinstance(payload, dict) else raw
            return _Installed.original_invocations(body, content_type, model, input_schema)
        result = StringIO()
        scoring_server.predictions_to_json(model.predict(frame), result)
        return scoring_server.InvocationsResponse(
            response=result.getvalue(), status=200, mimetype=MEDIA_JSON
        )
    finally:
        CURRENT_REQUEST.reset(token)
