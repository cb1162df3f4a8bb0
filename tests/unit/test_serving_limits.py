"""The rules that bound one served request (pricefuse.serving.limits), without a server.

The same rules against a live `mlflow models serve` of the demo model are in
tests/integration/test_pipeline.py (test_served_model_bounds_*).
"""

from __future__ import annotations

import io
import threading
import time

import pandas as pd
import pytest

from pricefuse.serving.limits import (
    Deadline,
    PixelBudget,
    Refusal,
    RequestLimits,
    WorkLanes,
    decode_json_body,
    json_rows,
    read_csv_body,
    read_parquet_body,
    request_columns_only,
)
from tests.support import project_params

SERVING = project_params().serving


def limits(**overrides) -> RequestLimits:
    return RequestLimits.from_config(SERVING, overrides)


def test_limits_come_from_params_and_serve_time_overrides_are_checked():
    base = RequestLimits.from_config(SERVING)
    assert base.max_rows == SERVING.max_rows and base.request_seconds == SERVING.request_seconds
    assert limits(max_rows="50").max_rows == 50  # JSON model configs may carry text
    with pytest.raises(ValueError, match="unknown serving limit 'max_row'"):
        limits(max_row=5)
    for bad in (0, -1, "many", float("nan"), True):
        with pytest.raises(ValueError, match=r"serving\.max_rows"):
            limits(max_rows=bad)


@pytest.mark.parametrize(
    ("payload", "rows"),
    [
        ({"dataframe_split": {"columns": ["catalog_content"], "data": [["a"], ["b"]]}}, 2),
        ({"dataframe_records": [{"catalog_content": "a"}] * 3}, 3),
        ({"instances": [{"catalog_content": "a"}] * 4}, 4),
        ({"inputs": {"catalog_content": ["a"] * 5, "image_link": ["x"]}}, 5),
        ({"inputs": {"catalog_content": "a"}}, 1),
        ({"dataframe_split": "nonsense"}, 0),
        ({"rows": [[1]]}, 0),
        ([1, 2], 0),
    ],
)
def test_json_rows_counts_every_request_shape(payload, rows):
    assert json_rows(payload) == rows


def test_json_bodies_mlflow_answered_with_a_500_are_400s():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(Refusal, match="nested too deeply") as caught:
        decode_json_body(deep)
    assert caught.value.status == 400
    with pytest.raises(Refusal, match="valid JSON"):
        decode_json_body(b'{"inputs": {"catalog_content": [' + b"9" * 6000 + b"]}}")
    with pytest.raises(Refusal, match="utf-8"):
        decode_json_body(b'{"a": "\xff"}')
    assert decode_json_body(b'{"a": NaN}')["a"] != 0  # MLflow's parser allows NaN: so do we


def test_row_and_body_limits_name_their_param():
    small = limits(max_rows=3, max_body_bytes=100)
    small.check_rows(3)
    with pytest.raises(Refusal, match=r"4 rows.*serving\.max_rows") as caught:
        small.check_rows(4)
    assert caught.value.status == 413
    with pytest.raises(Refusal, match=r"101 bytes.*serving\.max_body_bytes"):
        small.check_body(101)


def test_csv_bodies_are_read_as_text_and_bounded():
    body = b"sample_id,catalog_content,image_link,extra\n12,Item Name: tea,,x\n13,coffee,http://a/b.jpg,y\n"
    frame = read_csv_body(body, limits())
    assert list(frame.columns) == ["sample_id", "catalog_content", "image_link"]  # extra unread
    assert frame["sample_id"].tolist() == ["12", "13"] and frame["image_link"][0] == ""
    many = b"catalog_content\n" + b"tea\n" * 11
    with pytest.raises(Refusal, match=r"serving\.max_rows"):
        read_csv_body(many, limits(max_rows=10))
    for bad, words in [(b"", "empty"), (b"\xff\xfe", "utf-8"), (b'a,b\n"x', "CSV")]:
        with pytest.raises(Refusal, match=words) as caught:
            read_csv_body(bad, limits())
        assert caught.value.status == 400


def _parquet(frame: pd.DataFrame, **options) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, **options)
    return out.getvalue()


def test_parquet_bodies_are_refused_from_their_metadata_before_decoding():
    good = pd.DataFrame({"sample_id": [1, 2], "catalog_content": ["tea", "coffee"], "x": [1, 2]})
    frame = read_parquet_body(_parquet(good), limits())
    assert list(frame.columns) == ["sample_id", "catalog_content"]
    # a million rows in a few KB: refused on the row count, never decoded
    million = _parquet(pd.DataFrame({"catalog_content": ["tea"] * 1_000_000}), compression="zstd")
    assert len(million) < 100_000
    with pytest.raises(Refusal, match="1000000 rows") as caught:
        read_parquet_body(million, limits())
    assert caught.value.status == 413
    # one row of 50 MB of text that compresses to almost nothing
    bomb = _parquet(pd.DataFrame({"catalog_content": ["a" * 50_000_000]}), compression="zstd")
    assert len(bomb) < 100_000
    with pytest.raises(Refusal, match="decodes to"):
        read_parquet_body(bomb, limits(max_body_bytes=1_000_000))
    with pytest.raises(Refusal, match="Parquet") as caught:
        read_parquet_body(b"PAR1 not really", limits())
    assert caught.value.status == 400


def test_deadline_names_the_limit_and_what_was_being_done():
    deadline = Deadline(0.05)
    deadline.check("parsing")
    time.sleep(0.06)
    with pytest.raises(Refusal, match=r"0.05 s, serving.request_seconds.*encoding") as caught:
        deadline.check("encoding")
    assert caught.value.status == 504 and deadline.remaining() < 0
    assert Deadline(10, start=time.monotonic() - 11).remaining() < 0  # counts from arrival


def test_pixel_budget_is_shared_by_a_requests_threads():
    budget = PixelBudget(1000)
    taken = []
    threads = [threading.Thread(target=lambda: taken.append(budget.take(30))) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(taken) == 33 and budget.left == 10  # 33 x 30 = 990 fit, no more
    assert not budget.take(11) and budget.take(10)


def test_lanes_let_small_requests_pass_and_larger_ones_take_turns():
    lanes = WorkLanes(heavy=1)
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def heavy():
        with lanes.turn(light=False, wait_seconds=5):
            order.append("heavy")
            inside.set()
            release.wait(5)

    first = threading.Thread(target=heavy)
    first.start()
    assert inside.wait(5)
    with lanes.turn(light=True, wait_seconds=0):  # a small request does not wait
        order.append("light")
    started = time.monotonic()
    with pytest.raises(Refusal, match=r"serving\.heavy_requests") as caught, lanes.turn(False, 0.2):
        pass
    assert caught.value.status == 503 and 0.15 < time.monotonic() - started < 2
    release.set()
    first.join()
    with lanes.turn(light=False, wait_seconds=1):  # the turn was given back
        order.append("second heavy")
    assert order == ["heavy", "light", "second heavy"]


def test_is_light_needs_few_rows_and_a_small_body():
    small = limits(light_rows=2, light_body_bytes=1000)
    assert small.is_light(2, 1000)
    assert not small.is_light(3, 10) and not small.is_light(1, 1001)


def test_json_requests_keep_only_the_request_columns():
    wide = {
        "dataframe_split": {
            "columns": ["catalog_content", *[f"c{i}" for i in range(1000)], "sample_id"],
            "data": [["tea", *range(1000), 7]],
        },
        "params": {"interval_level": 0.9},
    }
    kept = request_columns_only(wide)
    assert kept["dataframe_split"]["columns"] == ["catalog_content", "sample_id"]
    assert kept["dataframe_split"]["data"] == [["tea", 7]] and kept["params"] == wide["params"]
    records = [{"catalog_content": "tea", "junk": 1}, {"catalog_content": "oil"}]
    assert request_columns_only({"dataframe_records": records})["dataframe_records"] == [
        {"catalog_content": "tea"},
        {"catalog_content": "oil"},
    ]
    columns = {"catalog_content": ["tea"], "junk": [1], "image_b64": [None]}
    assert request_columns_only({"inputs": columns})["inputs"] == {
        "catalog_content": ["tea"],
        "image_b64": [None],
    }
    ragged = {"dataframe_split": {"columns": ["catalog_content", "x"], "data": [["a"]]}}
    assert request_columns_only(ragged) == ragged  # MLflow names the problem itself
    assert request_columns_only([1, 2]) == [1, 2]
