"""The work one served request may cause, and the checks that keep it bounded.

Why: requests come from strangers, and a server's memory, cores and request threads are shared by
every client. Left unbounded, one request of a million rows (a few KB of Parquet), a few large
JSON bodies or a handful of slow images took every worker thread and gigabytes of memory while
`/ping` still answered, and good one-row requests timed out. So each request is checked, before
any work, against limits that come from the params snapshot's `serving` section (overridable at
serve time, `RequestLimits.from_config`):

- body bytes and rows per request, for every body MLflow accepts (`json_rows`, `read_csv_body`,
  `read_parquet_body`), refused with a 413 naming the limit;
- a deadline per request (`Deadline`): the model checks it between chunks of rows and between
  the parts of a chunk, so the work of a request the server gave up on stops;
- turns (`WorkLanes`): small requests never queue; larger ones are priced a few at a time per
  process and wait a bounded time for their turn, or get a 503 to retry later;
- a per-request pixel budget (`PixelBudget`) over all of a request's images.

Free of MLflow: the server glue (pricefuse.serving.server_guard) and the model
(pricefuse.serving.model) both use these, and tests drive them directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import threading
import time
import typing
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pricefuse.core.config import ServingLimits
from pricefuse.serving.inputs import INPUT_ID, INPUT_IMAGE_B64, INPUT_IMAGE_LINK, INPUT_TEXT

# The request columns: a Parquet or CSV body's other columns are never read.
REQUEST_COLUMNS = (INPUT_ID, INPUT_TEXT, INPUT_IMAGE_LINK, INPUT_IMAGE_B64)
# A Parquet body may expand to at most this many times the body limit once decoded; a small body
# that claims more (a compressed column of repeated text) is refused before it is decoded.
PARQUET_EXPANSION = 4


class Refusal(Exception):
    """A request refused before or during its work: an HTTP `status` and a message for the
    client that names the limit (never a stack trace)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits(ServingLimits):
    """The `serving.*` limits on one request's work (`ServingLimits`, params.yaml documents each),
    with the checks that apply them."""

    @classmethod
    def from_config(cls, serving: Any, overrides: Mapping[str, Any] | None = None) -> RequestLimits:
        """The limits of a params `serving` section, with `overrides` (an operator's
        SERVING_MODEL_CONFIG at serve time: `{"max_rows": 200}`) taking precedence.

        An override of an unknown key or a value that is not a positive number is an error
        naming it: a typo must not leave a limit silently at its default.
        """
        types = typing.get_type_hints(ServingLimits)
        values = {name: getattr(serving, name) for name in types}
        for key, value in (overrides or {}).items():
            if key not in values:
                known = ", ".join(types)
                raise ValueError(
                    f"unknown serving limit {key!r} in the model config; known: {known}"
                )
            values[key] = value
        checked: dict[str, Any] = {}
        for name, kind in types.items():
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"serving.{name} must be a number, got {value!r}")
            try:
                number = float(value) if kind is float else int(str(value))
            except ValueError as exc:
                raise ValueError(f"serving.{name} must be a number, got {value!r}") from exc
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"serving.{name} must be positive, got {value!r}")
            checked[name] = number
        return cls(**checked)

    def check_rows(self, rows: int) -> None:
        """413 when a request carries more rows than `max_rows`."""
        if rows > self.max_rows:
            raise Refusal(
                413,
                f"the request has {rows} rows; at most {self.max_rows} are priced per request "
                "(serving.max_rows): send them in smaller requests",
            )

    def check_body(self, size: int) -> None:
        """413 when a body is larger than `max_body_bytes`."""
        if size > self.max_body_bytes:
            raise Refusal(
                413,
                f"the request body has {size} bytes; at most {self.max_body_bytes} are accepted "
                "(serving.max_body_bytes): send the rows in smaller requests",
            )

    def is_light(self, rows: int, body_bytes: int) -> bool:
        """A request small enough never to wait for a turn (`WorkLanes`): few rows, small body
        (a body is parsed in its turn, so many large bodies are never parsed at once)."""
        return rows <= self.light_rows and body_bytes <= self.light_body_bytes


class Deadline:
    """The monotonic time by which a request's work must be done; `check` raises a 504 Refusal
    past it. Why inside the model: MLflow's server stops *waiting* after its timeout but the
    thread running the model goes on; checked between chunks and parts, the work stops too."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = seconds
        self.at = (time.monotonic() if start is None else start) + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self, doing: str) -> None:
        if time.monotonic() >= self.at:
            raise Refusal(
                504,
                f"the request ran out of time ({self.seconds:g} s, serving.request_seconds) "
                f"while {doing}: send fewer rows or images per request",
            )


class PixelBudget:
    """The decoded pixels a request's images may use together (thread-safe: a request's images
    load concurrently). Reserved from the header's size before decoding, so a refused image
    costs no decode; rows past the budget are priced text-only with `pixel_budget`."""

    def __init__(self, pixels: int) -> None:
        self.left = pixels
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if pixels > self.left:
                return False
            self.left -= pixels
            return True


class WorkLanes:
    """Turns for larger requests: at most `heavy` priced at once per process.

    Why: the cores are shared, so two large batches at once finish no sooner than one after the
    other, and each holds its memory meanwhile. Small requests (`RequestLimits.is_light`) never
    wait: a one-row request beside a 1,000-row one is answered in its own time. A larger request
    waits at most `queue_seconds` for its turn, then gets a 503 to retry later rather than hold
    a request thread.
    """

    def __init__(self, heavy: int) -> None:
        self.heavy = heavy
        self._turns = threading.BoundedSemaphore(heavy)

    @contextlib.contextmanager
    def turn(self, light: bool, wait_seconds: float) -> Iterator[None]:
        if light:
            yield
            return
        if not self._turns.acquire(timeout=max(wait_seconds, 0.0)):
            raise Refusal(
                503,
                f"the server is pricing {self.heavy} large request(s) (serving.heavy_requests) "
                f"and this one waited {wait_seconds:g} s (serving.queue_seconds): retry later, "
                "or send at most serving.light_rows rows per request",
            )
        try:
            yield
        finally:
            self._turns.release()


@dataclass(frozen=True)
class RequestContext:
    """What the server knows about the request being priced in this thread."""

    limits: RequestLimits
    deadline: Deadline


# Set by the server glue for the request a thread is running; None outside a server (e.g.
# `pricefuse predict`, whose caller chose its input and waits for all of it).
CURRENT_REQUEST: ContextVar[RequestContext | None] = ContextVar("pricefuse_request", default=None)
# When the request's body began to arrive (set in the server's event loop; threads inherit it).
REQUEST_ARRIVED: ContextVar[float | None] = ContextVar("pricefuse_arrived", default=None)


def json_rows(payload: Any) -> int:
    """Rows in an MLflow JSON request (`dataframe_split`, `dataframe_records`, `instances`,
    `inputs`; columns as a dict of lists count their longest list). 0 when none is found:
    MLflow then refuses the shape itself."""
    if not isinstance(payload, dict):
        return 0
    for key in ("dataframe_split", "dataframe_records", "instances", "inputs"):
        if key not in payload:
            continue
        value = payload[key]
        if key == "dataframe_split":
            data = value.get("data") if isinstance(value, dict) else None
            return len(data) if isinstance(data, list) else 0
        if isinstance(value, list):
            return len(value)
        if isinstance(value, dict):
            return max((len(v) if isinstance(v, list) else 1 for v in value.values()), default=0)
        return 1
    return 0


def request_columns_only(payload: Any) -> Any:
    """An MLflow JSON request with only the request columns (`REQUEST_COLUMNS`) kept.

    Why: unknown columns are ignored, but MLflow builds and checks every column a request names
    before the model sees it, so one row of 100,000 made-up columns cost seconds and memory
    for nothing. Shapes it does not recognise — or a `dataframe_split` whose rows do not match
    its columns — are left as they are, for MLflow's own error naming the shape.
    """
    if not isinstance(payload, dict):
        return payload

    def keep(record: Any) -> Any:
        if isinstance(record, dict):
            return {k: v for k, v in record.items() if k in REQUEST_COLUMNS}
        return record

    out = dict(payload)
    split = out.get("dataframe_split")
    if isinstance(split, dict):
        columns, data = split.get("columns"), split.get("data")
        if (
            isinstance(columns, list)
            and isinstance(data, list)
            and all(isinstance(row, list) and len(row) == len(columns) for row in data)
        ):
            kept = [i for i, name in enumerate(columns) if name in REQUEST_COLUMNS]
            if len(kept) < len(columns):
                out["dataframe_split"] = {
                    **split,
                    "columns": [columns[i] for i in kept],
                    "data": [[row[i] for i in kept] for row in data],
                }
    for key in ("dataframe_records", "instances", "inputs"):
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [keep(record) for record in value]
        elif key == "inputs" and isinstance(value, dict):
            out[key] = keep(value)
    return out


def decode_json_body(body: bytes) -> Any:
    """The parsed JSON body, or a 400 Refusal saying why not.

    Why not leave it to MLflow: its parser turns a body nested deeper than Python's recursion
    limit, or an integer of more digits than Python converts, into a bare 500.
    """
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"the body is not valid utf-8 text: {exc}") from None
    except RecursionError:
        raise Refusal(400, "the body is not valid JSON for pricing: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a number of 5,000 digits
        raise Refusal(
            400, f"Ensure that input is a valid JSON formatted string: {str(exc)[:300]}"
        ) from None


def read_csv_body(body: bytes, limits: RequestLimits) -> pd.DataFrame:
    """A CSV body as a DataFrame of text cells (empty cells as ""), refused when it has more
    than `max_rows` rows (only `max_rows` + 1 are ever parsed).

    Why here and not MLflow's CSV path: it casts columns to the signature's pandas types, which
    our `sample_id` (any type, checked by `validate_input`) does not have, so every CSV body got
    a 400 with a stack trace. As text, every cell reaches `validate_input` as the JSON formats'
    strings do: `"12"` is an id, `""` a missing link.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"the CSV body is not valid utf-8 text: {exc}") from None
    if not text.strip():
        raise Refusal(400, "the CSV body is empty: expected a header line and rows")
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            nrows=limits.max_rows + 1,
            usecols=lambda name: name in REQUEST_COLUMNS,
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise Refusal(
            400, f"Failed to parse input as a CSV table with a header line: {str(exc)[:300]}"
        ) from None
    limits.check_rows(len(frame))
    return frame


def read_parquet_body(body: bytes, limits: RequestLimits) -> pd.DataFrame:
    """A Parquet body's request columns as a DataFrame, refused (413) before decoding when its
    metadata counts more than `max_rows` rows or more than `PARQUET_EXPANSION` × the body limit
    of decoded bytes: a few KB of Parquet can expand to a million rows or gigabytes of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(body))
        meta = parquet.metadata
        limits.check_rows(meta.num_rows)
        wanted = [name for name in parquet.schema_arrow.names if name in REQUEST_COLUMNS]
        decoded = 0
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            for leaf in range(row_group.num_columns):
                chunk = row_group.column(leaf)
                if chunk.path_in_schema.split(".", 1)[0] in wanted:
                    decoded += chunk.total_uncompressed_size
        ceiling = PARQUET_EXPANSION * limits.max_body_bytes
        if decoded > ceiling:
            raise Refusal(
                413,
                f"the Parquet body decodes to {decoded} bytes; at most {ceiling} "
                f"({PARQUET_EXPANSION} x serving.max_body_bytes) are accepted",
            )
        table = parquet.read(columns=wanted)
    except Refusal:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on malformed files
        raise Refusal(
            400, f"Failed to parse input as a Parquet table: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    limits.check_rows(table.num_rows)  # the metadata's count, confirmed
    return table.to_pandas()


def cut_message(message: str, limit: int = 2000) -> str:
    """`message` cut to `limit` characters: an error must not echo a whole request back."""
    return message if len(message) <= limit else message[:limit] + " ...(cut)"
