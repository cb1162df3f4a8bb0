import pandas as pd
import pytest

from pricefuse.serving import InvalidInputError, model_signature, validate_input


def test_missing_text_column_is_named():
    with pytest.raises(InvalidInputError, match="catalog_content"):
        validate_input(pd.DataFrame({"image_link": ["x"]}))


def test_bad_rows_are_listed():
    frame = pd.DataFrame({"catalog_content": ["Item Name: a", "", None, 5]})
    with pytest.raises(InvalidInputError, match=r"3 row\(s\).*1, 2, 3"):
        validate_input(frame)


def test_optional_columns_are_normalised():
    out = validate_input(
        pd.DataFrame({"catalog_content": ["Item Name: a"], "image_link": [float("nan")]})
    )
    assert out["image_link"].tolist() == [None]
    assert out["image_b64"].tolist() == [None]


def test_signature_requires_only_text():
    sig = model_signature(0.8)
    required = [c.name for c in sig.inputs.inputs if c.required]
    assert required == ["catalog_content"]
