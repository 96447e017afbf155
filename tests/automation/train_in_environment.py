"""A training command for a registered environment: it proves where it runs, then writes the
model it is given as $MLMESH_OUTPUT_DIR/model.onnx.

    python train_in_environment.py MODEL_ONNX

It imports `mlmesh_env_probe`, which only the registered environment has, and exits 4 when a
package of the automation service's own environment (scikit-learn) can be imported: the run
must see the environment's packages and no others.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import mlmesh_env_probe

if importlib.util.find_spec("sklearn") is not None:
    print(f"scikit-learn is importable from {sys.prefix}: not an isolated environment", flush=True)
    sys.exit(4)
shutil.copyfile(sys.argv[1], Path(os.environ["MLMESH_OUTPUT_DIR"]) / "model.onnx")
print(f"trained in {sys.prefix} with mlmesh-env-probe {mlmesh_env_probe.VERSION}")
