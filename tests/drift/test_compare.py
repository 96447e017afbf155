"""`mlmesh drift compare`: two files compared offline with the monitors' statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def write_pair(folder: Path) -> tuple[Path, Path]:
    """Reference and current data: `age` shifted by half a standard deviation, a new city `d`."""
    generator = np.random.default_rng(3)
    reference = pd.DataFrame(
        {
            "age": generator.normal(40, 10, 20_000),
            "income": generator.lognormal(10, 1, 20_000),
            "city": generator.choice(["a", "b", "c"], 20_000),
        }
    )
    current = pd.DataFrame(
        {
            "age": generator.normal(45, 10, 10_000),
            "income": generator.lognormal(10, 1, 10_000),
            "city": generator.choice(["a", "b", "c", "d"], 10_000, p=[0.3, 0.3, 0.3, 0.1]),
        }
    )
    reference.to_csv(folder / "reference.csv", index=False)
    current.to_parquet(folder / "current.parquet")
    return folder / "reference.csv", folder / "current.parquet"


def test_compare_flags_the_shifted_columns_and_reports_a_new_category(tmp_path: Path) -> None:
    reference, current = write_pair(tmp_path)
    result = runner.invoke(app, ["drift", "compare", str(reference), str(current), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["rows"] == 10_000 and found["drift_detected"] is True
    assert sorted(found["drifted_features"]) == ["age", "city"]
    assert found["features"]["age"]["drifted"] and found["features"]["age"]["wasserstein"] > 0.4
    assert not found["features"]["income"]["drifted"]
    assert found["features"]["city"]["unseen_categories"] == ["d"]
    # Without --json: a table naming every feature.
    table = runner.invoke(app, ["drift", "compare", str(reference), str(current), "--features", "age,income"])
    assert table.exit_code == 0 and "drift detected" in table.output and "city" not in table.output


def test_the_same_data_is_not_drift(tmp_path: Path) -> None:
    reference, _ = write_pair(tmp_path)
    result = runner.invoke(app, ["drift", "compare", str(reference), str(reference), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["drift_detected"] is False


def test_bad_files_and_columns_say_what_is_wrong(tmp_path: Path) -> None:
    reference, current = write_pair(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    for arguments, words in [
        ([str(reference), str(tmp_path / "notes.txt")], "give a .csv or .parquet file"),
        ([str(reference), str(tmp_path / "broken.parquet")], "cannot be read as parquet"),
        ([str(reference), str(tmp_path / "missing.csv")], "cannot be read as csv"),
        ([str(reference), str(current), "--features", "height"], "no column 'height'"),
    ]:
        result = runner.invoke(app, ["drift", "compare", *arguments])
        assert result.exit_code == 2, result.output
        assert words in result.output
