"""`mlmesh demo`: the whole MLOps loop on this machine, in one command.

Train a model on scikit-learn's breast-cancer data, register it with its lineage, convert it to
ONNX, profile it, deploy it with capture, send traffic, shift the inputs until a drift monitor
fires, let a retrain policy train a challenger on the new data and promote it when it beats the
champion, roll it out through a canary, and watch every event arrive, signed, at a webhook
receiver running here. The mesh stays up afterwards for exploring.

`python -m services.demo train` is the training command the demo's retrain policy runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "demo-cancer"
ENDPOINT = "demo-cancer"
MONITOR = "demo-cancer-inputs"
POLICY = "demo-cancer-retrain"
SHIFT = 1.6
"""Live inputs after the world moved: every feature this many times larger."""
FEATURES = [f"f{index}" for index in range(30)]
Say = Callable[[str], None]


# ---------------------------------------------------------------- data and training


def cancer_frames(seed: int = 5) -> dict[str, Any]:
    """scikit-learn's breast-cancer data (no download), shuffled and split: train, holdout, live."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    loaded = load_breast_cancer()
    frame = pd.DataFrame(loaded.data.astype(np.float32), columns=FEATURES)
    frame["label"] = loaded.target
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return {"train": frame.iloc[:300], "holdout": frame.iloc[300:420], "live": frame.iloc[420:]}


def shifted(frame: Any) -> Any:
    moved = frame.copy()
    moved[FEATURES] = moved[FEATURES] * SHIFT
    return moved


def fit(frame: Any) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=40, max_depth=6, random_state=0)
    model.fit(frame[FEATURES].to_numpy(np.float32), frame["label"].to_numpy())
    return model


def train_main() -> None:
    """The retrain policy's command: fit on $MLMESH_TRAINING_DATA, write ONNX and metrics."""
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    frame = pd.read_csv(os.environ["MLMESH_TRAINING_DATA"])
    model = fit(frame)
    features = frame[FEATURES].to_numpy(np.float32)
    # The same input name and outputs as the builder's conversion of the first version: both
    # deployments of the endpoint answer the same requests during the canary.
    onnx_model = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(FEATURES)]))],
        options={id(model): {"zipmap": False}},
    )
    output = Path(os.environ["MLMESH_OUTPUT_DIR"])
    (output / "model.onnx").write_bytes(onnx_model.SerializeToString())
    accuracy = float(model.score(features, frame["label"].to_numpy()))
    (output / "metrics.json").write_text(json.dumps({"train_accuracy": accuracy}))
    print(f"trained a random forest on {len(frame)} rows, train accuracy {accuracy:.3f}")


# ---------------------------------------------------------------- the webhook receiver


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that verifies every delivery with the `standardwebhooks`
    package and counts the events by kind (each webhook-id once)."""

    secret: str = ""
    kinds: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    verified: int = 0
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_event: Callable[[str], None] = lambda kind: None

    def receive(self, headers: dict[str, str], body: bytes) -> int:
        from standardwebhooks import Webhook, WebhookVerificationError

        try:
            event = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            with self.lock:
                self.rejected += 1
            return 401
        with self.lock:
            self.verified += 1
            if headers["webhook-id"] not in self.seen:
                self.seen.add(headers["webhook-id"])
                kind = str(event.get("type", "")).removeprefix("io.mlmesh.").removesuffix(".v1")
                self.kinds[kind] += 1
                self.on_event(kind)
        return 204


@contextlib.contextmanager
def serving(receiver: Receiver) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the name http.server calls
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = receiver.receive({key.lower(): value for key, value in self.headers.items()}, body)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *arguments: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mlmesh-events"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- talking to the endpoint


def predict(address: str, rows: np.ndarray, input_name: str) -> str:
    """One OIP ModelInfer call on the endpoint; the version that answered."""
    import grpc

    from services._proto.inference import open_inference_pb2 as oip
    from services._proto.inference import open_inference_pb2_grpc as oip_grpc

    request = oip.ModelInferRequest(model_name=ENDPOINT)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    with grpc.insecure_channel(address) as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return answer.model_version


def send(address: str, frame: Any, batch: int = 1) -> tuple[int, Counter[str]]:
    """Send every row (one request per `batch` rows); (requests that failed, answers by version)."""
    import grpc

    rows = frame[FEATURES].to_numpy(np.float32)
    name = input_name(address)
    failed, versions = 0, Counter[str]()
    for start in range(0, len(rows), batch):
        try:
            version = predict(address, rows[start : start + batch], name)
            versions[version] += 1
        except grpc.RpcError:
            failed += 1
    return failed, versions


def input_name(address: str) -> str:
    import grpc

    from services._proto.inference import open_inference_pb2 as oip
    from services._proto.inference import open_inference_pb2_grpc as oip_grpc

    with grpc.insecure_channel(address) as channel:
        metadata = oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            oip.ModelMetadataRequest(name=ENDPOINT), timeout=30
        )
    return metadata.inputs[0].name


# ---------------------------------------------------------------- the walk


def run(home: Path, say: Say, step: Callable[[str], contextlib.AbstractContextManager[None]]) -> dict[str, Any]:
    """The whole loop against the mesh of `home` (started when none runs); the summary."""
    import pandas as pd

    from services import launcher
    from services.client import (
        AutomationClient,
        BuilderClient,
        DeployerClient,
        DriftClient,
        NotifierClient,
        ProfilerClient,
        RegistryClient,
    )
    from services.common.settings import MeshSettings

    started = time.monotonic()
    state = launcher.read_state(home)
    if state is None or not launcher.live_pids(state):
        with step("starting the mesh (SQLite, embedded NATS)"):
            state = launcher.start(home, nats_url=MeshSettings().nats_url, say=lambda line: None)
    address = {name: service.address for name, service in state.services.items()}
    scratch = home / "demo"
    scratch.mkdir(parents=True, exist_ok=True)
    frames = cancer_frames()
    receiver = Receiver(on_event=lambda kind: say(f"  webhook received {kind} (signature verified)"))
    summary: dict[str, Any] = {"home": str(home)}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serving(receiver))
        registry = stack.enter_context(RegistryClient(address["registry"], actor="demo"))
        builder = stack.enter_context(BuilderClient(address["builder"], actor="demo", timeout=600))
        profiler = stack.enter_context(ProfilerClient(address["profiler"], actor="demo"))
        deployer = stack.enter_context(DeployerClient(address["deployer"], actor="demo"))
        drift = stack.enter_context(DriftClient(address["drift"], actor="demo"))
        notifier = stack.enter_context(NotifierClient(address["notifier"], actor="demo"))
        automation = stack.enter_context(AutomationClient(address["automation"], actor="demo"))

        with step("a webhook receiver on 127.0.0.1 for every event"):
            for hook in notifier.list():
                if hook.description == "mlmesh demo":
                    notifier.delete(hook.id)
            created = notifier.create(url, ["*"], "mlmesh demo")
            receiver.secret = created.secret
            summary["webhook"] = {"id": created.webhook.id, "url": url}

        with step("training a random forest and registering it with its lineage"):
            paths = {}
            for name in ("train", "holdout"):
                paths[name] = scratch / f"cancer-{name}.csv"
                frames[name].to_csv(paths[name], index=False)
            train_set = registry.register_dataset("demo-cancer-train", paths["train"])
            model = fit(frames["train"])
            import pickle

            (scratch / "model.pkl").write_bytes(pickle.dumps(model))
            run_id = f"demo-{int(time.time())}"
            accuracy = float(model.score(frames["holdout"][FEATURES].to_numpy(np.float32), frames["holdout"]["label"]))
            registry.record_run(
                run_id=run_id,
                experiment="demo",
                name="first training",
                metrics={"holdout_accuracy": accuracy},
                datasets=[f"{train_set.name}:{train_set.version}"],
                status="FINISHED",
            )
            from services._proto.mlmesh.v1 import registry_pb2

            lineage = registry_pb2.Lineage(
                run_id=run_id, experiment="demo", datasets=[f"{train_set.name}:{train_set.version}"]
            )
            native = registry.register_model(MODEL, [scratch / "model.pkl"], framework="sklearn", lineage=lineage)
            summary["trained"] = {"version": native.version, "holdout_accuracy": round(accuracy, 4)}
            say(f"  {MODEL}:{native.version} (scikit-learn), holdout accuracy {accuracy:.3f}")

        with step("converting to ONNX with a parity check"):
            conversion = builder.convert(f"{MODEL}:{native.version}")
            registry.set_alias(MODEL, "champion", conversion.version, "the first ONNX version")
            summary["converted"] = {
                "version": conversion.version,
                "labels_equal": conversion.parity.labels_equal,
                "max_abs_diff": conversion.parity.max_abs_diff,
                "speedup_one_row": round(conversion.speed.speedup_one_row, 1),
            }
            say(
                f"  {MODEL}:{conversion.version} (ONNX): labels equal {conversion.parity.labels_equal}, "
                f"max difference {conversion.parity.max_abs_diff:.2g}, {conversion.speed.speedup_one_row:.1f}x "
                "faster on one row; it is the champion"
            )

        with step("profiling it on the real runtime"):
            profile = profiler.profile(
                f"{MODEL}@champion",
                slo_p99_ms=50,
                concurrency=[1, 4],
                sizes=[{"cpus": 1}],
                step_seconds=1,
                warmup_seconds=0.3,
            )
            recommendation = profile.recommendation
            summary["profile"] = {
                "id": profile.id,
                "met": recommendation.met,
                "explanation": recommendation.explanation,
            }
            say(f"  {recommendation.explanation}")

        with step("deploying it with capture (blue, the recommended size)"):
            for endpoint in deployer.list():
                if endpoint.name == ENDPOINT:
                    deployer.delete(ENDPOINT)
            deployer.create(ENDPOINT, f"{MODEL}@champion", capture=True, recommended_resources=True, replicas=0)
            endpoint = wait_ready(deployer, "blue")
            grpc_address = endpoint.grpc_address
            summary["endpoint"] = {"grpc": grpc_address, "http": endpoint.http_address}

        with step("sending live traffic"):
            failed, _ = send(grpc_address, frames["live"])
            say(f"  {len(frames['live'])} requests, {failed} failed")

        with step("watching for drift, then shifting the inputs"):
            for monitor in drift.list_monitors():
                if monitor.name == MONITOR:
                    drift.delete_monitor(MONITOR)
            drift.create_monitor(
                MONITOR,
                ENDPOINT,
                baseline_dataset=f"{train_set.name}:{train_set.version}",
                exclude=["label"],
                window_rows=len(frames["live"]) * 2,
            )
            moved = shifted(frames["live"])
            failed, _ = send(grpc_address, pd.concat([moved, moved]))
            say(f"  {len(moved) * 2} requests with every feature x{SHIFT}, {failed} failed")

        with step("a retrain policy that answers drift"):
            for policy in automation.list_policies():
                if policy.name == POLICY:
                    automation.delete_policy(POLICY)
            retrain_data = pd.concat([frames["train"], shifted(frames["train"])])
            paths["retrain"] = scratch / "cancer-retrain.csv"
            retrain_data.to_csv(paths["retrain"], index=False)
            retrain_set = registry.register_dataset("demo-cancer-retrain", paths["retrain"])
            holdout = pd.concat([frames["holdout"], shifted(frames["holdout"])])
            paths["holdout"] = scratch / "cancer-holdout.csv"
            holdout.to_csv(paths["holdout"], index=False)
            holdout_set = registry.register_dataset("demo-cancer-holdout", paths["holdout"])
            automation.create_policy(
                POLICY,
                MODEL,
                command=[sys.executable, "-m", "services.demo", "train"],
                training_dataset=f"{retrain_set.name}:{retrain_set.version}",
                holdout_dataset=f"{holdout_set.name}:{holdout_set.version}",
                label_column="label",
                metric="accuracy",
                min_delta=0.01,
                trigger="drift",
                monitor=MONITOR,
                working_dir=str(Path.cwd()),
            )

        with step("checking drift (the captured window against the training data)"):
            result = wait_drift(drift)
            summary["drift"] = {"detected": result.drift_detected, "drifted_features": len(result.drifted_features)}
            say(f"  drift detected in {len(result.drifted_features)} of {len(result.features)} features")

        with step("retraining, and comparing challenger with champion"):
            retrain = wait_retrain(automation)
            summary["retrain"] = {
                "run": retrain.id,
                "produced_version": retrain.produced_version,
                "promoted": retrain.promoted,
                "challenger_accuracy": round(retrain.challenger_score, 4),
                "champion_accuracy": round(retrain.champion_score, 4),
                "decision": retrain.message,
            }
            say(f"  {retrain.message}")
            if not retrain.promoted:
                raise RuntimeError(f"the challenger was not promoted: {retrain.message}")

        with step("rolling the new champion out through a canary (green at 10%, then 100%)"):
            deployer.create(ENDPOINT, f"{MODEL}@champion", deployment="green", traffic=10, capture=True)
            wait_ready(deployer, "green")
            failed, versions = send(grpc_address, moved)
            if failed:
                deployer.set_traffic(ENDPOINT, {"blue": 100})
                raise RuntimeError(f"{failed} requests failed during the canary: rolled back to blue")
            say(f"  canary: {dict(versions)} answered, none failed")
            deployer.set_traffic(ENDPOINT, {"green": 100})
            deployer.delete(ENDPOINT, "blue")
            failed, versions = send(grpc_address, moved)
            summary["rollout"] = {"canary_failed": 0, "after": dict(versions)}
            say(f"  green takes all traffic: {dict(versions)}")

        with step("waiting for the last events at the webhook receiver"):
            deadline = time.monotonic() + 20
            while receiver.kinds["model.promoted"] < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)
    summary["promoted_version"] = retrain.produced_version
    summary["events"] = dict(sorted(receiver.kinds.items()))
    summary["webhook_deliveries_verified"] = receiver.verified
    summary["webhook_deliveries_rejected"] = receiver.rejected
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def wait_ready(deployer: Any, deployment: str, timeout: float = 180) -> Any:
    from services._proto.mlmesh.v1 import deployer_pb2

    deadline = time.monotonic() + timeout
    while True:
        endpoint = deployer.get(ENDPOINT)
        state = {d.name: d for d in endpoint.deployments}.get(deployment)
        if state is not None and state.status == deployer_pb2.DEPLOYMENT_STATUS_READY:
            return endpoint
        if state is not None and state.status == deployer_pb2.DEPLOYMENT_STATUS_FAILED:
            raise RuntimeError(f"{ENDPOINT}/{deployment} failed: {state.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ENDPOINT}/{deployment} was not ready within {timeout:g} s")
        time.sleep(0.3)


def wait_drift(drift: Any, timeout: float = 90) -> Any:
    """Check until the captured window holds the shifted rows and drift is detected."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = drift.check(MONITOR)
            if last.drift_detected:
                return last
        except Exception as error:  # nothing captured yet: the collector writes every few seconds
            last = error
        time.sleep(2)
    raise RuntimeError(f"no drift detected within {timeout:g} s (last check: {last})")


def wait_retrain(automation: Any, timeout: float = 180) -> Any:
    from services._proto.mlmesh.v1 import automation_pb2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = automation.list_runs(POLICY)
        if runs and runs[0].status != automation_pb2.RUN_STATUS_RUNNING:
            if runs[0].status == automation_pb2.RUN_STATUS_FAILED:
                raise RuntimeError(f"the retrain run failed: {runs[0].message}")
            return runs[0]
        time.sleep(0.5)
    raise RuntimeError(f"the drift did not lead to a finished retrain run within {timeout:g} s")


if __name__ == "__main__":
    if sys.argv[1:] == ["train"]:
        train_main()
    else:
        sys.exit("usage: python -m services.demo train (the demo's training command); run the demo with `mlmesh demo`")
