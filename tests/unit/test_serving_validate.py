import pandas as pd
import pytest

from pricefuse.serving.inputs import InvalidInputError, validate_input
from pricefuse.serving.model import model_signature
from tests.support import project_params

MAX_TEXT_CHARS = project_params().serving.max_text_chars


def test_missing_text_column_is_named():
    with pytest.raises(InvalidInputError, match="catalog_content"):
        validate_input(pd.DataFrame({"image_link": ["x"]}), MAX_TEXT_CHARS)


def test_bad_rows_are_listed():
    frame = pd.DataFrame({"catalog_content": ["Item Name: a", "", None, 5]})
    with pytest.raises(InvalidInputError, match=r"3 row\(s\).*1, 2, 3"):
        validate_input(frame, MAX_TEXT_CHARS)


@pytest.mark.parametrize("marker", ["nan", "None", " NULL "])
def test_stringified_nulls_are_refused_like_missing_text(marker: str):
    """MLflow's `inputs` format turns JSON null into "None" and NaN into "nan"."""
    frame = pd.DataFrame({"catalog_content": ["Item Name: nan bread", marker]})
    with pytest.raises(InvalidInputError, match=r"1 row\(s\) .*null.*\(row index 1\)"):
        validate_input(frame, MAX_TEXT_CHARS)


def test_optional_columns_are_normalised():
    out = validate_input(
        pd.DataFrame({"catalog_content": ["Item Name: a"], "image_link": [float("nan")]}),
        MAX_TEXT_CHARS,
    )
    assert out["image_link"].tolist() == [None]
    assert out["image_b64"].tolist() == [None]


def test_text_longer_than_the_limit_is_refused_with_the_limit_named():
    frame = pd.DataFrame({"catalog_content": ["tea", "x" * 11]})
    refused = r"1 row\(s\) have more than 10 characters .*'catalog_content' \(row index 1\)"
    with pytest.raises(InvalidInputError, match=refused):
        validate_input(frame, max_text_chars=10)
    assert len(validate_input(frame, max_text_chars=11)) == 2


def test_image_columns_must_be_text_or_null():
    frame = pd.DataFrame({"catalog_content": ["a", "b"], "image_b64": [None, 5]}, dtype=object)
    with pytest.raises(InvalidInputError, match=r"image_b64.*row index 1"):
        validate_input(frame, MAX_TEXT_CHARS)


def test_repeated_columns_are_refused():
    frame = pd.DataFrame([["a", "b"]], columns=["catalog_content", "catalog_content"])
    with pytest.raises(InvalidInputError, match="more than once"):
        validate_input(frame, MAX_TEXT_CHARS)


def test_signature_requires_only_text():
    sig = model_signature(0.8)
    required = [c.name for c in sig.inputs.inputs if c.required]
    assert required == ["catalog_content"]


def test_signature_leaves_sample_id_to_validate_input():
    """MLflow's own `long` enforcement turns 1.5 into 1; validate_input refuses it instead."""
    from mlflow.models.utils import _enforce_schema

    frame = pd.DataFrame({"catalog_content": ["a"], "sample_id": [1.5]})
    enforced = _enforce_schema(frame, model_signature(0.8).inputs)
    with pytest.raises(InvalidInputError, match="non-integer 'sample_id'"):
        validate_input(enforced, MAX_TEXT_CHARS)


def test_input_example_of_rows_without_image_links_satisfies_the_signature(tmp_path) -> None:
    """The ensemble stage logs the test CSV's first rows as the example; when those have no image
    link (most rows in the scale benchmark), MLflow must still accept it against the signature."""
    from mlflow.models.utils import _enforce_schema

    from pricefuse.serving.model import input_example

    csv = tmp_path / "test.csv"
    pd.DataFrame(
        {"sample_id": [1, 2, 3], "catalog_content": ["a", "b", "c"], "image_link": ["", "", ""]}
    ).to_csv(csv, index=False)
    example = input_example(csv)
    assert example["image_link"].tolist() == ["", "", ""]
    _enforce_schema(example, model_signature(0.8).inputs)  # raised for float NaN links
