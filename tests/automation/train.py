"""A training command as a retrain policy runs it: reads $MLMESH_TRAINING_DATA (a CSV whose
`label` column holds the answers), fits a scikit-learn classifier, and writes model.onnx and
metrics.json into $MLMESH_OUTPUT_DIR.

    python train.py logistic   # a real model
    python train.py shuffled   # fitted on shuffled labels: a poor challenger
    python train.py renamed    # a real model whose input is named `features`, not `X`: it scores
                               # well offline but cannot answer the endpoint's requests
    python train.py fail       # exits 3 after printing why
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

kind = sys.argv[1]
if kind == "fail":
    print("the training data is not what this script expects", flush=True)
    sys.exit(3)
frame = pd.read_csv(os.environ["MLMESH_TRAINING_DATA"])
features = frame.drop(columns=["label"]).to_numpy(dtype=np.float32)
labels = frame["label"].to_numpy()
if kind == "shuffled":
    labels = np.random.default_rng(7).permutation(labels)
estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
estimator.fit(features, labels)
output = Path(os.environ["MLMESH_OUTPUT_DIR"])
model = to_onnx(estimator, features[:1], options={id(estimator): {"zipmap": False}})
if kind == "renamed":
    model.graph.input[0].name = "features"
    for node in model.graph.node:
        node.input[:] = ["features" if name == "X" else name for name in node.input]
(output / "model.onnx").write_bytes(model.SerializeToString())
(output / "metrics.json").write_text(json.dumps({"train_accuracy": float(estimator.score(features, labels))}))
print(f"trained {kind} on {len(frame)} rows (run {os.environ['MLMESH_RUN_ID']})")
