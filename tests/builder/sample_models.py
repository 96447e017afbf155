"""Small models for the conversion tests, trained in a second on seeded data, the samples they are
checked on, and hostile pickles that attack the process that loads them."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes

CITIES = ("lyon", "nantes", "paris", "nice")


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[pd.DataFrame, np.ndarray]:
    """569 rows of 30 named numeric features and a binary label."""
    features, labels = load_breast_cancer(return_X_y=True, as_frame=True)
    return features, labels.to_numpy()


@pytest.fixture(scope="module")
def diabetes() -> tuple[np.ndarray, np.ndarray]:
    """442 rows of 10 numeric features and a target scaled to about 0.3-3.5."""
    features, target = load_diabetes(return_X_y=True)
    return features, target / 100


@pytest.fixture(scope="module")
def customers() -> tuple[pd.DataFrame, np.ndarray]:
    """400 seeded rows of float, integer and string columns, and a label that needs all of them."""
    random = np.random.default_rng(0)
    rows = 400
    frame = pd.DataFrame(
        {
            "age": random.normal(45, 12, rows).round(1),
            "income": random.lognormal(10.5, 0.4, rows).round(2),
            "rooms": random.integers(1, 7, rows),
            "city": random.choice(np.array(CITIES, dtype=object), rows),
        }
    )
    score = (frame["age"] - 45) / 12 + np.log(frame["income"]) - 10.5 + frame["city"].isin(["paris", "nice"]) * 0.8
    return frame, (score + random.normal(0, 0.3, rows) > 0.4).astype(int).to_numpy()


def save_model(model: Any, path: Path) -> Path:
    """`model` as the registry stores it: a joblib file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, path)
    return path


def save_pickle(value: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(value))
    return path


def save_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def save_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def save_input_example(frame: pd.DataFrame, path: Path, *, wrapped: bool = False) -> Path:
    """An MLflow input_example.json: pandas' split orient, or the same inside "dataframe_split"."""
    split = {"columns": [str(column) for column in frame.columns], "data": json.loads(frame.to_json(orient="values"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataframe_split": split} if wrapped else split))
    return path


class SleepsWhenLoaded:
    """Unpickling this starts a shell that sleeps in the background and in the foreground: a load that
    never ends and leaves processes behind in the loader's process group."""

    def __reduce__(self):
        return (os.system, ("sleep 1000 & sleep 1000",))


class ExitsWhenLoaded:
    """Unpickling this ends the process that loads it with exit code 3."""

    def __reduce__(self):
        return (os._exit, (3,))


class GrowsWhenLoaded:
    """Unpickling this writes 4 GiB in 64 MiB steps: far above a 512 MB limit, far below this machine's memory."""

    def __reduce__(self):
        return (eval, ("[b'x' * 2**26 for _ in range(64)]",))


class SpinsWhenLoaded:
    """Unpickling this adds zeros forever, on one core."""

    def __reduce__(self):
        return (eval, ("sum(iter(int, 1))",))
