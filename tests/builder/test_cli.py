"""`mlmesh env ...` and `mlmesh build convert` against a real builder process."""

from __future__ import annotations

import json

from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from services.cli import app
from tests.builder.test_servicer import register_pickle
from tests.builder.wheels import make_wheel

runner = CliRunner()


def invoke(builder, *arguments: str):
    return runner.invoke(app, list(arguments), env={"MLMESH_BUILDER_ADDRESS": builder.address})


def json_of(result) -> object:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return json.loads(result.stdout)


def test_env_register_show_and_list_print_name_and_version(builder_process, tmp_path):
    make_wheel(builder_process.wheels, "clitool", "2.0")
    (tmp_path / "requirements.txt").write_text("clitool\n")
    registered = json_of(
        invoke(builder_process, "env", "register", "cli-env", str(tmp_path / "requirements.txt"), "--json")
    )
    assert (registered["name"], registered["version"], registered["created"]) == ("cli-env", 1, True)
    assert registered["lock"][0]["name"] == "clitool" and registered["lock"][0]["version"] == "2.0"
    shown = json_of(invoke(builder_process, "env", "show", "cli-env:1", "--json"))
    assert (shown["name"], shown["version"]) == ("cli-env", 1)
    listed = json_of(invoke(builder_process, "env", "list", "--prefix", "cli-", "--json"))
    assert [(item["name"], item["version"]) for item in listed] == [("cli-env", 1)]
    table = invoke(builder_process, "env", "show", "cli-env")
    assert table.exit_code == 0 and "clitool" in table.stdout


def test_env_register_of_an_unresolvable_file_prints_pips_reason(builder_process, tmp_path):
    (tmp_path / "requirements.txt").write_text("nosuchclitool==1\n")
    result = invoke(builder_process, "env", "register", "cli-bad", str(tmp_path / "requirements.txt"))
    assert result.exit_code == 1 and "nosuchclitool" in result.output


def test_build_convert_json_prints_the_new_version_the_parity_and_the_speedups(builder_process, tmp_path):
    features, labels = load_breast_cancer(return_X_y=True)
    ref = register_pickle(
        builder_process, tmp_path, "cli-model", LogisticRegression(max_iter=5000).fit(features, labels)
    )
    converted = json_of(invoke(builder_process, "build", "convert", ref, "--json"))
    assert converted["version"] == int(ref.split(":")[1]) + 1
    assert converted["max_abs_diff"] <= 1e-5 and converted["labels_equal"] is True
    assert converted["speedup_one_row"] > 0 and converted["speedup_1000_rows"] > 0


def test_build_commands_say_when_the_builder_is_away(tmp_path):
    result = runner.invoke(app, ["env", "list"], env={"MLMESH_BUILDER_ADDRESS": "127.0.0.1:9"})
    assert result.exit_code == 2 and "builder" in result.output
