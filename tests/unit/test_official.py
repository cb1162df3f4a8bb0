from pathlib import Path

from click.testing import CliRunner

from pricefuse.cli import main
from pricefuse.data.official import OFFICIAL_FILES, check_official


def test_partial_copy_is_caught(tmp_path: Path):
    fake = tmp_path / "train.csv"
    fake.write_text("sample_id,catalog_content,image_link,price\n")
    problem = check_official(fake)
    assert problem is not None and "partial copy" in problem


def test_unknown_name_and_missing_file(tmp_path: Path):
    assert "not an official file name" in check_official(tmp_path / "x.csv")
    assert "not found" in check_official(tmp_path / "test.csv")


def test_cli_exits_nonzero_naming_the_file(tmp_path: Path):
    fake = tmp_path / "test.csv"
    fake.write_text("x")
    result = CliRunner().invoke(main, ["check-raw", str(fake)])
    assert result.exit_code == 1
    assert "test.csv" in result.output


def test_published_identities():
    assert OFFICIAL_FILES["train.csv"].size == 73_495_639
    assert OFFICIAL_FILES["test.csv"].sha256.startswith("6d26bff5")
