"""Data and policies the automation tests share: scikit-learn's breast-cancer data registered
as a training and a holdout dataset, and policies running tests/automation/train.py."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from services.client import AutomationClient, RegistryClient
from tests.conftest import RegistryProcess, start_service, stop_process

TRAIN = str(Path(__file__).with_name("train.py"))
SERVICE = "mlmesh.v1.AutomationService"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """scikit-learn's breast-cancer data, split into a training and a holdout dataset."""
    loaded = load_breast_cancer()
    frame = pd.DataFrame(loaded.data.astype(np.float32), columns=[f"f{i}" for i in range(30)])
    frame["label"] = loaded.target
    shuffled = frame.sample(frac=1.0, random_state=3)
    directory = tmp_path_factory.mktemp("data")
    shuffled.iloc[:400].to_csv(directory / "train.csv", index=False)
    shuffled.iloc[400:].to_csv(directory / "holdout.csv", index=False)
    with RegistryClient(registry_process.address) as registry:
        train = registry.register_dataset("cancer-train", directory / "train.csv")
        holdout = registry.register_dataset("cancer-holdout", directory / "holdout.csv")
    return {"train": train.name, "holdout": f"{holdout.name}:{holdout.version}", "dir": str(directory)}


def policy(client: AutomationClient, name: str, model: str, kind: str, data: dict[str, str], **extra: Any) -> None:
    client.create_policy(
        name,
        model,
        command=[sys.executable, TRAIN, kind],
        training_dataset=data["train"],
        holdout_dataset=data["holdout"],
        label_column="label",
        metric="accuracy",
        min_delta=0.01,
        working_dir=str(ROOT),
        **extra,
    )


@dataclass
class AutomationProcess:
    address: str
    home: Path

    def client(self) -> AutomationClient:
        return AutomationClient(self.address)


@contextlib.contextmanager
def running_automation(home: Path, registry: RegistryProcess, **settings: str) -> Iterator[AutomationProcess]:
    """`python -m services.automation` on a free port; `settings` become MLMESH_AUTOMATION_<NAME> variables."""
    started = start_service("automation", home, registry.nats_url, {"registry_address": registry.address, **settings})
    try:
        yield AutomationProcess(started.address, home)
    finally:
        stop_process(started.process)
