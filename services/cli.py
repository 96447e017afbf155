"""The `mlmesh` command: run the mesh locally and manage models, datasets, runs and events.

Every command takes `--json` for machine-readable output. Exit codes: 0 success, 1 the server
(or a local check) refused the request, 2 bad usage or the registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import html
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from services import launcher
from services._proto.mlmesh.v1 import (
    automation_pb2,
    builder_pb2,
    deployer_pb2,
    drift_pb2,
    notifier_pb2,
    profiler_pb2,
    registry_pb2,
)
from services.client import (
    AutomationClient,
    BuilderClient,
    CollectorClient,
    DeployerClient,
    DriftClient,
    MeshError,
    NotifierClient,
    ProfilerClient,
    RegistryClient,
)
from services.client import Progress as ProgressCallback
from services.common import events
from services.common.errors import MlmeshError
from services.common.settings import MeshSettings

Client = TypeVar("Client", RegistryClient, DeployerClient, BuilderClient, CollectorClient)
console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="mlmesh",
    help="mlmesh: register, version and ship machine-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Register, find, download, tag, alias, archive and delete model versions.")
alias_app = typer.Typer(help="Move and remove aliases such as `champion` (a model reference `name@alias`).")
datasets_app = typer.Typer(help="Register and inspect datasets (CSV or Parquet, summarised per column).")
runs_app = typer.Typer(help="Record and inspect training runs that model versions point to.")
audit_app = typer.Typer(help="Read the audit log: who changed what, when and why.")
events_app = typer.Typer(help="Watch the lifecycle events that the mesh publishes on NATS.")
batch_app = typer.Typer(help="Score Parquet or CSV files in batch with a model version or an endpoint.")
deploy_app = typer.Typer(help="Serve model versions at endpoints: deployments, blue/green traffic, logs.")
env_app = typer.Typer(help="Register reusable environments: pip requirements resolved to an exact lock with hashes.")
build_app = typer.Typer(help="Convert models to ONNX (with a parity check) and build Docker images that serve them.")
drift_app = typer.Typer(
    help="Watch endpoints for drift: monitors against a baseline, checks, results, offline compare."
)
monitor_app = typer.Typer(help="Create, list, show and delete drift monitors.")
profiles_app = typer.Typer(help="List and show stored profiles (`mlmesh profile REF` makes one).")
retrain_app = typer.Typer(
    help="Retrain policies: what starts a retraining, how it trains, and when the result replaces the champion."
)
policy_app = typer.Typer(help="Create, list, show and delete retrain policies.")
webhooks_app = typer.Typer(
    help="Send lifecycle events to your HTTP endpoints, signed as Standard Webhooks say; see each delivery."
)
captures_app = typer.Typer(
    help="What endpoints received and answered: query, statistics, export as a dataset, labels, retention."
)
app.add_typer(models_app, name="models", no_args_is_help=True)
models_app.add_typer(alias_app, name="alias", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets", no_args_is_help=True)
app.add_typer(runs_app, name="runs", no_args_is_help=True)
app.add_typer(audit_app, name="audit", no_args_is_help=True)
app.add_typer(events_app, name="events", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy", no_args_is_help=True)
app.add_typer(batch_app, name="batch", no_args_is_help=True)
app.add_typer(env_app, name="env", no_args_is_help=True)
app.add_typer(build_app, name="build", no_args_is_help=True)
app.add_typer(drift_app, name="drift", no_args_is_help=True)
drift_app.add_typer(monitor_app, name="monitor", no_args_is_help=True)
app.add_typer(captures_app, name="captures", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks", no_args_is_help=True)
app.add_typer(retrain_app, name="retrain", no_args_is_help=True)
retrain_app.add_typer(policy_app, name="policy", no_args_is_help=True)


class CliSettings(MeshSettings):
    """What the CLI reads from the environment, beside the mesh-wide MLMESH_* settings."""

    registry_address: str = ""
    """host:port of the registry (MLMESH_REGISTRY_ADDRESS); empty means the running local mesh."""

    deployer_address: str = ""
    """host:port of the deployer (MLMESH_DEPLOYER_ADDRESS); empty means the running local mesh."""

    builder_address: str = ""
    """host:port of the builder (MLMESH_BUILDER_ADDRESS); empty means the running local mesh."""

    profiler_address: str = ""
    """host:port of the profiler (MLMESH_PROFILER_ADDRESS); empty means the running local mesh."""

    notifier_address: str = ""
    """host:port of the notifier (MLMESH_NOTIFIER_ADDRESS); empty means the running local mesh."""

    automation_address: str = ""
    """host:port of the automation service (MLMESH_AUTOMATION_ADDRESS); empty means the running local mesh."""

    drift_address: str = ""
    """host:port of the drift service (MLMESH_DRIFT_ADDRESS); empty means the running local mesh."""

    collector_address: str = ""
    """host:port of the collector (MLMESH_COLLECTOR_ADDRESS); empty means the running local mesh."""


AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the registry. Default: MLMESH_REGISTRY_ADDRESS, else the mesh that "
        "`mlmesh up` started in MLMESH_HOME, else 127.0.0.1:MLMESH_REGISTRY_PORT (50051).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept in the audit log and the event.")]
TagOption = Annotated[
    list[str] | None, typer.Option("--tag", help="A tag as key=value; repeat for more.", show_default=False)
]


# ---------------------------------------------------------------- helpers


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` in red on stderr and exit with `code`."""
    error_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def service_address(name: str, explicit: str | None) -> str:
    """--address, else MLMESH_<NAME>_ADDRESS, else the local mesh's service, else its default port."""
    if explicit:
        return explicit
    settings = CliSettings()
    configured = getattr(settings, f"{name}_address")
    if configured:
        return configured
    state = launcher.read_state(settings.home.resolve())
    if state and name in state.services:
        return state.services[name].address
    return launcher.default_address(name)


@contextmanager
def connected(name: str, client_type: Callable[..., Client], address: str | None) -> Iterator[Client]:
    """A client of the service `name`; turns failures into a red message and an exit code."""
    resolved = service_address(name, address)
    try:
        with client_type(resolved, CliSettings().actor or None) as client:
            yield client
    except MeshError as error:
        if error.unreachable:
            fail(f"cannot reach the {name} at {resolved}; start it with `mlmesh up`", 2)
        fail(error.message)
    except (ValueError, OSError) as error:  # local problems: a missing file, a clashing name
        fail(str(error))


def registry(address: str | None) -> contextlib.AbstractContextManager[RegistryClient]:
    return connected("registry", RegistryClient, address)


def deployer(address: str | None) -> contextlib.AbstractContextManager[DeployerClient]:
    return connected("deployer", DeployerClient, address)


def builder(address: str | None) -> contextlib.AbstractContextManager[BuilderClient]:
    return connected("builder", BuilderClient, address)


def profiler(address: str | None) -> contextlib.AbstractContextManager[ProfilerClient]:
    return connected("profiler", ProfilerClient, address)


def notifier(address: str | None) -> contextlib.AbstractContextManager[NotifierClient]:
    return connected("notifier", NotifierClient, address)


def automation(address: str | None) -> contextlib.AbstractContextManager[AutomationClient]:
    return connected("automation", AutomationClient, address)


def drift(address: str | None) -> contextlib.AbstractContextManager[DriftClient]:
    return connected("drift", DriftClient, address)


def to_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data, with proto field names and 64-bit ints as numbers."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """["k=v", ...] -> {"k": "v"}; a value may itself contain '='."""
    pairs: dict[str, str] = {}
    for value in values or []:
        key, separator, text = value.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"{value!r} is not key=value", param_hint=option)
        pairs[key] = text
    return pairs


_RELATIVE_TIME = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str | None, option: str) -> datetime | None:
    """ISO 8601 (`2025-03-01`, `2025-03-01T12:00:00Z`; local time when no zone) or an age (`30m`, `2d`)."""
    if not text:
        return None
    relative = _RELATIVE_TIME.fullmatch(text.strip())
    if relative:
        return datetime.now(UTC) - timedelta(seconds=float(relative[1]) * _UNIT_SECONDS[relative[2]])
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO 8601 time (2025-03-01T12:00:00Z) nor an age (30m, 2h, 7d)",
            param_hint=option,
        ) from None


def parse_duration(text: str | None, option: str) -> float:
    """A duration (`90s`, `30m`, `1h`, `7d`, `2w`) in seconds; 0 when not given."""
    if not text:
        return 0.0
    found = _RELATIVE_TIME.fullmatch(text.strip())
    if not found:
        raise typer.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 1h or 7d", param_hint=option)
    return float(found[1]) * _UNIT_SECONDS[found[2]]


def when(value: Timestamp) -> str:
    if not value.seconds and not value.nanos:
        return "-"
    return value.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_size(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def status_name(status: int) -> str:
    return registry_pb2.ModelVersionStatus.Name(status).removeprefix("MODEL_VERSION_STATUS_")


def format_tags(tags: Any) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(tags.items())) or "-"


def format_tensors(tensors: Any) -> str:
    return ", ".join(f"{t.name}: {t.datatype}[{', '.join(str(d) for d in t.shape)}]" for t in tensors) or "-"


@contextmanager
def transfer_progress(description: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr, fed by the SDK's (done, total) callback; None when disabled."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance


def progress_bar(*columns: Any, quiet: bool) -> Progress:
    """A progress bar on stderr (description, bar, then `columns`) that goes away when done; none when quiet."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), *columns, console=error_console, transient=True, disable=quiet
    )


def new_table(*headers: str, **options: Any) -> Table:
    """A table whose cells wrap instead of being cut: ids and hashes must stay whole."""
    table = Table(**options)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def show_version(version: registry_pb2.ModelVersion) -> None:
    """A model version as a key/value sheet followed by its files."""
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold")
    sheet.add_column()
    lineage = version.lineage
    rows = [
        ("model", f"{version.name}:{version.version}"),
        ("status", status_name(version.status)),
        ("framework", version.framework or "-"),
        ("aliases", ", ".join(version.aliases) or "-"),
        ("tags", format_tags(version.tags)),
        ("description", version.description or "-"),
        ("created", f"{when(version.created_at)} by {version.created_by or '-'}"),
        ("updated", when(version.updated_at)),
        ("inputs", format_tensors(version.signature.inputs)),
        ("outputs", format_tensors(version.signature.outputs)),
        ("run", lineage.run_id or "-"),
        ("git", " ".join(filter(None, [lineage.git.repo, lineage.git.branch, lineage.git.commit])) or "-"),
        ("datasets", ", ".join(lineage.datasets) or "-"),
        ("used by", ", ".join(version.used_by) or "-"),
    ]
    for key, value in rows:
        sheet.add_row(key, escape(value))
    console.print(sheet)
    files = new_table("path", "size", "sha256", title="files", title_justify="left")
    for file in version.files:
        files.add_row(escape(file.path), human_size(file.size), file.sha256[:16])
    console.print(files)


def versions_table(versions: list[registry_pb2.ModelVersion]) -> Table:
    table = new_table("model", "status", "framework", "aliases", "tags", "created")
    for version in versions:
        table.add_row(
            escape(f"{version.name}:{version.version}"),
            status_name(version.status),
            version.framework,
            escape(", ".join(version.aliases)),
            escape(format_tags(version.tags)),
            when(version.created_at),
        )
    return table


# ---------------------------------------------------------------- the mesh


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Start in the background and return.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Start NATS and every service locally, with their data under MLMESH_HOME.

    Without --detach it stays in the foreground and stops everything on Ctrl-C.
    Logs go to MLMESH_HOME/logs; set MLMESH_NATS_URL to use an existing NATS instead.
    """
    settings = MeshSettings()

    def say(line: str) -> None:
        (error_console if as_json else console).print(escape(line), soft_wrap=True)

    def ready(state: launcher.MeshState) -> None:
        if as_json:
            print_json(json.loads(state.to_json()))

    try:
        launcher.up(settings.home, detach=detach, nats_url=settings.nats_url, say=say, on_ready=ready)
    except launcher.LaunchError as error:
        fail(str(error))
    if detach and not as_json:
        console.print("mlmesh is up in the background; stop it with `mlmesh down`")


@app.command()
def down(as_json: JsonOption = False) -> None:
    """Stop the services and NATS that `mlmesh up` started in MLMESH_HOME."""
    home = MeshSettings().home
    stopped = launcher.down(home, say=(lambda _line: None) if as_json else console.print)
    if as_json:
        print_json({"home": str(home.resolve()), "stopped": stopped})


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Show NATS and each service with its address and health (SERVING, NOT_SERVING, UNREACHABLE, STOPPED)."""
    report = launcher.status(MeshSettings().home)
    if as_json:
        print_json(report)
        return
    console.print(f"home  {escape(report['home'])}")
    console.print(f"nats  {escape(report['nats_url'] or '- (not started by mlmesh up)')}")
    colours = {"SERVING": "green", "NOT_SERVING": "yellow", "UNREACHABLE": "red", "STOPPED": "dim"}
    table = new_table("service", "address", "status", "pid")
    for name, service in report["services"].items():
        colour = colours.get(service["status"], "white")
        table.add_row(name, service["address"], f"[{colour}]{service['status']}[/{colour}]", str(service["pid"] or "-"))
    console.print(table)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"Which service to run: {', '.join(launcher.SERVICES)}.")],
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Processes sharing the service's port (sets MLMESH_<SERVICE>_WORKERS); up to the number of "
            "cores pays. Default: that setting, else 1.",
        ),
    ] = None,
) -> None:
    """Run one service in the foreground (what `mlmesh up` runs per service; for containers)."""
    try:
        launcher.serve(service, workers)
    except launcher.LaunchError as error:
        fail(str(error), 2)


@app.command()
def version(as_json: JsonOption = False) -> None:
    """Print the version of mlmesh."""
    try:
        number = package_metadata.version("mlmesh")
    except package_metadata.PackageNotFoundError:
        number = "0+unknown"
    if as_json:
        print_json({"version": number})
    else:
        console.print(f"mlmesh {number}")


# ---------------------------------------------------------------- models


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="Model name; the registry assigns the next version number.")],
    files: Annotated[list[Path], typer.Argument(help="Files or directories (uploaded recursively) of the model.")],
    tag: TagOption = None,
    framework: Annotated[
        str, typer.Option(help="onnx, sklearn, xgboost, lightgbm, pytorch or other; guessed when empty.")
    ] = "",
    description: Annotated[str, typer.Option(help="What this version is.")] = "",
    run_id: Annotated[str, typer.Option("--run-id", help="The training run that produced it.")] = "",
    experiment: Annotated[str, typer.Option(help="The experiment of that run.")] = "",
    git_repo: Annotated[str, typer.Option("--git-repo", help="Source repository of the training code.")] = "",
    git_branch: Annotated[str, typer.Option("--git-branch", help="Branch of the training code.")] = "",
    git_commit: Annotated[str, typer.Option("--git-commit", help="Commit of the training code.")] = "",
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="A training dataset as name:version; repeatable.")
    ] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a new version of model NAME from FILE... and print it."""
    lineage = registry_pb2.Lineage(
        run_id=run_id,
        experiment=experiment,
        git=registry_pb2.GitInfo(repo=git_repo, branch=git_branch, commit=git_commit),
        datasets=dataset or [],
    )
    tags = parse_pairs(tag, "--tag")
    with registry(address) as client, transfer_progress(f"uploading {name}", not as_json) as progress:
        version = client.register_model(
            name, files, framework=framework, description=description, tags=tags, lineage=lineage, progress=progress
        )
    if as_json:
        print_json(to_dict(version))
    else:
        size = sum(file.size for file in version.files)
        console.print(
            f"registered [bold]{escape(version.name)}:{version.version}[/bold] "
            f"({len(version.files)} files, {human_size(size)}, framework {escape(version.framework or '-')})"
        )


@models_app.command("import-mlflow")
def models_import_mlflow(
    directory: Annotated[Path, typer.Argument(help="An MLflow model directory (with its MLmodel file).")],
    name: Annotated[str, typer.Argument(help="Model name to register it under.")],
    tag: TagOption = None,
    description: Annotated[str, typer.Option(help="What this version is.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register an MLflow model directory; framework, signature and run id come from its MLmodel."""
    tags = parse_pairs(tag, "--tag")
    with registry(address) as client, transfer_progress(f"importing {name}", not as_json) as progress:
        version = client.import_mlflow(directory, name, description=description, tags=tags, progress=progress)
    if as_json:
        print_json(to_dict(version))
    else:
        console.print(
            f"imported [bold]{escape(version.name)}:{version.version}[/bold] (framework {escape(version.framework)})"
        )


@models_app.command("list")
def models_list(
    name_prefix: Annotated[str, typer.Option("--name-prefix", help="Only models whose name starts so.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List models with their latest version and aliases."""
    with registry(address) as client:
        models = list(client.iter_models(name_prefix))
    if as_json:
        print_json([to_dict(model) for model in models])
        return
    table = new_table("model", "latest", "versions", "aliases", "updated")
    for model in models:
        aliases = ", ".join(f"{alias}->{number}" for alias, number in sorted(model.aliases.items()))
        table.add_row(
            escape(model.name),
            str(model.latest_version),
            str(model.version_count),
            escape(aliases),
            when(model.updated_at),
        )
    console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="name:version, name@alias, or name for the latest version.")],
    at: Annotated[
        str | None, typer.Option(help="For name@alias: the version the alias named at this time (ISO 8601 or 2d).")
    ] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one model version: metadata, lineage, signature and files."""
    moment = parse_time(at, "--at")
    with registry(address) as client:
        version = client.get(ref, at=moment)
    profile = latest_profile(version.name, version.version)
    if as_json:
        value = to_dict(version)
        if profile is not None:
            value["profile"] = {"id": profile.id, **to_dict(profile.recommendation), "slo": to_dict(profile.slo)}
        print_json(value)
    else:
        show_version(version)
        if profile is not None:
            console.print(
                f"[bold]profile[/bold]  {profile.id} (p99 {profile.slo.p99_ms:g} ms on {profile.target}): "
                f"{escape(profile.recommendation.explanation)}",
                soft_wrap=True,
            )


def latest_profile(name: str, version: int) -> profiler_pb2.Profile | None:
    """The version's newest completed profile, when a profiler answers (else nothing: it is optional here)."""
    try:
        with ProfilerClient(service_address("profiler", None), timeout=3) as client:
            return client.latest(name, version)
    except MeshError:
        return None


@models_app.command("search")
def models_search(
    name_prefix: Annotated[str, typer.Option("--name-prefix", help="Name starts with this.")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value, or key to require the tag; repeat to AND.")
    ] = None,
    framework: Annotated[str, typer.Option(help="Only this framework.")] = "",
    alias: Annotated[str, typer.Option(help="Only versions this alias points at now.")] = "",
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO 8601, or an age: 2h, 7d).")] = None,
    until: Annotated[str | None, typer.Option(help="Created before (ISO 8601, or an age).")] = None,
    order_by: Annotated[
        str, typer.Option("--order-by", help="created_at, -created_at (default), name, -name, version, -version.")
    ] = "",
    include_archived: Annotated[bool, typer.Option("--include-archived", help="Include archived versions.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many versions.", min=1)] = 100,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find model versions by name, tags, framework, alias and creation time."""
    filters = {
        "name_prefix": name_prefix,
        "tags": tag or [],
        "framework": framework,
        "alias": alias,
        "created_after": parse_time(since, "--since"),
        "created_before": parse_time(until, "--until"),
        "order_by": order_by,
        "include_archived": include_archived,
        "page_size": min(limit, 1000),
    }
    with registry(address) as client:
        versions = []
        for version in client.iter_search(**filters):
            versions.append(version)
            if len(versions) >= limit:
                break
    if as_json:
        print_json([to_dict(version) for version in versions])
    else:
        console.print(versions_table(versions))


@models_app.command("download")
def models_download(
    ref: Annotated[str, typer.Argument(help="name:version, name@alias, or name for the latest version.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the files (created when missing).")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a version's files into DIRECTORY, each verified against its sha256."""
    with registry(address) as client, transfer_progress(f"downloading {ref}", not as_json) as progress:
        version = client.download(ref, directory, progress=progress)
    if as_json:
        print_json({**to_dict(version), "directory": str(directory.resolve())})
    else:
        console.print(
            f"downloaded [bold]{escape(version.name)}:{version.version}[/bold] "
            f"({len(version.files)} files) to {escape(str(directory))}"
        )


@models_app.command("tag")
def models_tag(
    ref: Annotated[str, typer.Argument(help="name:version, name@alias, or name for the latest version.")],
    pairs: Annotated[list[str] | None, typer.Argument(help="Tags to set, as key=value.", show_default=False)] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="A tag key to remove; repeatable.")] = None,
    description: Annotated[str | None, typer.Option(help="Replace the description.")] = None,
    reason: ReasonOption = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set or remove tags of a version, or change its description."""
    set_tags = parse_pairs(pairs, "PAIRS")
    if not set_tags and not remove and description is None:
        raise typer.BadParameter("give key=value tags, --remove KEY or --description", param_hint="PAIRS")
    with registry(address) as client:
        version = client.update(ref, set_tags=set_tags, remove_tags=remove, description=description, reason=reason)
    if as_json:
        print_json(to_dict(version))
    else:
        console.print(f"{escape(version.name)}:{version.version} tags: {escape(format_tags(version.tags))}")


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. champion or staging.")],
    version: Annotated[int, typer.Argument(help="Version number the alias should point at.", min=1)],
    reason: Annotated[str, typer.Option("--reason", help="Why it moves; kept in the alias history.")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point NAME@ALIAS at VERSION."""
    with registry(address) as client:
        response = client.set_alias(name, alias, version, reason)
    if as_json:
        print_json(
            {
                "name": name,
                "alias": alias,
                "version": response.model_version.version,
                "previous_version": response.previous_version,
                "model_version": to_dict(response.model_version),
            }
        )
    else:
        was = f" (was {response.previous_version})" if response.previous_version else " (new)"
        console.print(f"{escape(name)}@{escape(alias)} -> {response.model_version.version}{was}")


@alias_app.command("rm")
def alias_remove(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias to remove.")],
    reason: ReasonOption = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove NAME@ALIAS."""
    with registry(address) as client:
        previous = client.remove_alias(name, alias, reason)
    if as_json:
        print_json({"name": name, "alias": alias, "previous_version": previous})
    else:
        console.print(f"removed {escape(name)}@{escape(alias)} (it pointed at {previous})")


@models_app.command("history")
def models_history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option(help="Only this alias.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show how the model's aliases moved: when, to which version, by whom and why."""
    with registry(address) as client:
        changes = client.alias_history(name, alias)
    if as_json:
        print_json([to_dict(change) for change in changes])
        return
    table = new_table("at", "alias", "version", "actor", "reason")
    for change in changes:
        table.add_row(
            when(change.at),
            escape(change.alias),
            str(change.version) if change.version else "[dim]removed[/dim]",
            escape(change.actor),
            escape(change.reason),
        )
    console.print(table)


@models_app.command("archive")
def models_archive(
    ref: Annotated[str, typer.Argument(help="name:version or name@alias.")],
    reason: ReasonOption = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Archive a version: it stays downloadable but leaves default searches."""
    with registry(address) as client:
        version = client.archive(ref, reason)
    if as_json:
        print_json(to_dict(version))
    else:
        console.print(f"archived {escape(version.name)}:{version.version}")


@models_app.command("delete")
def models_delete(
    ref: Annotated[str, typer.Argument(help="name:version or name@alias.")],
    reason: ReasonOption = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a version and its files for good (refused while a deployment uses it)."""
    if not yes:
        typer.confirm(f"Delete {ref} and its files for good?", abort=True, err=True)
    with registry(address) as client:
        client.delete(ref, reason)
    if as_json:
        print_json({"ref": ref, "deleted": True})
    else:
        console.print(f"deleted {escape(ref)}")


# ---------------------------------------------------------------- datasets


def show_dataset(dataset: registry_pb2.Dataset) -> None:
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold")
    sheet.add_column()
    for key, value in [
        ("dataset", f"{dataset.name}:{dataset.version}"),
        ("format", dataset.format),
        ("file", f"{dataset.file.path} ({human_size(dataset.file.size)})"),
        ("rows", str(dataset.row_count)),
        ("fingerprint", dataset.fingerprint),
        ("tags", format_tags(dataset.tags)),
        ("description", dataset.description or "-"),
        ("created", f"{when(dataset.created_at)} by {dataset.created_by or '-'}"),
    ]:
        sheet.add_row(key, escape(value))
    console.print(sheet)
    columns = new_table(
        "column", "type", "nulls", "min", "max", "mean", "distinct", title="columns", title_justify="left"
    )
    for column in dataset.columns:

        def number(field: str, column: registry_pb2.ColumnSummary = column) -> str:
            return f"{getattr(column, field):.4g}" if column.HasField(field) else ""

        columns.add_row(
            escape(column.name),
            column.type,
            str(column.null_count),
            number("min"),
            number("max"),
            number("mean"),
            str(column.distinct_count or ""),
        )
    console.print(columns)


@datasets_app.command("register")
def datasets_register(
    name: Annotated[str, typer.Argument(help="Dataset name; the registry assigns the next version.")],
    file: Annotated[Path, typer.Argument(help="One CSV or Parquet file.")],
    file_format: Annotated[str, typer.Option("--format", help="csv or parquet; guessed from the file name.")] = "",
    description: Annotated[str, typer.Option(help="What the data is.")] = "",
    tag: TagOption = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload FILE as the next version of dataset NAME; the registry summarises every column."""
    tags = parse_pairs(tag, "--tag")
    with registry(address) as client, transfer_progress(f"uploading {name}", not as_json) as progress:
        dataset = client.register_dataset(name, file, file_format, description, tags, progress)
    if as_json:
        print_json(to_dict(dataset))
    else:
        console.print(
            f"registered dataset [bold]{escape(dataset.name)}:{dataset.version}[/bold] "
            f"({dataset.row_count} rows, {len(dataset.columns)} columns)"
        )


@datasets_app.command("list")
def datasets_list(
    name_prefix: Annotated[str, typer.Option("--name-prefix", help="Only datasets whose name starts so.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List dataset versions."""
    with registry(address) as client:
        datasets = list(client.iter_datasets(name_prefix))
    if as_json:
        print_json([to_dict(dataset) for dataset in datasets])
        return
    table = new_table("dataset", "format", "rows", "size", "created")
    for dataset in datasets:
        table.add_row(
            escape(f"{dataset.name}:{dataset.version}"),
            dataset.format,
            str(dataset.row_count),
            human_size(dataset.file.size),
            when(dataset.created_at),
        )
    console.print(table)


@datasets_app.command("download")
def datasets_download(
    ref: Annotated[str, typer.Argument(help="name:version, or name for the latest version.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the file (created when missing).")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a dataset version's file into DIRECTORY, verified against its sha256."""
    with registry(address) as client, transfer_progress(f"downloading {ref}", not as_json) as progress:
        path = client.download_dataset(ref, directory, progress=progress)
    if as_json:
        print_json({"ref": ref, "path": str(path.resolve())})
    else:
        console.print(f"downloaded {escape(ref)} to {escape(str(path))}")


@datasets_app.command("show")
def datasets_show(
    ref: Annotated[str, typer.Argument(help="name:version, or name for the latest version.")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a dataset version with its column summaries."""
    with registry(address) as client:
        dataset = client.get_dataset(ref)
    if as_json:
        print_json(to_dict(dataset))
    else:
        show_dataset(dataset)


# ---------------------------------------------------------------- runs


@runs_app.command("record")
def runs_record(
    experiment: Annotated[str, typer.Option(help="Experiment the run belongs to.")] = "",
    run_id: Annotated[
        str, typer.Option("--id", help="The run's id (e.g. the training job id); generated if empty.")
    ] = "",
    name: Annotated[str, typer.Option(help="A readable name of the run.")] = "",
    param: Annotated[list[str] | None, typer.Option("--param", help="A parameter as key=value; repeatable.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="A metric as key=number; repeatable.")] = None,
    run_status: Annotated[str, typer.Option("--status", help="FINISHED, FAILED or KILLED.")] = "FINISHED",
    git_repo: Annotated[str, typer.Option("--git-repo", help="Source repository.")] = "",
    git_branch: Annotated[str, typer.Option("--git-branch", help="Branch.")] = "",
    git_commit: Annotated[str, typer.Option("--git-commit", help="Commit.")] = "",
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="A dataset as name:version; repeatable.")
    ] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a finished training run (its params, metrics, code and data)."""
    metrics: dict[str, float] = {}
    for key, value in parse_pairs(metric, "--metric").items():
        try:
            metrics[key] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{key}={value}: the value is not a number", param_hint="--metric") from None
    with registry(address) as client:
        run = client.record_run(
            run_id=run_id,
            experiment=experiment,
            name=name,
            params=parse_pairs(param, "--param"),
            metrics=metrics,
            git=registry_pb2.GitInfo(repo=git_repo, branch=git_branch, commit=git_commit),
            datasets=dataset or [],
            status=run_status,
        )
    if as_json:
        print_json(to_dict(run))
    else:
        console.print(f"recorded run [bold]{escape(run.id)}[/bold]")


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a recorded run."""
    with registry(address) as client:
        run = client.get_run(run_id)
    if as_json:
        print_json(to_dict(run))
        return
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold")
    sheet.add_column()
    for key, value in [
        ("run", run.id),
        ("experiment", run.experiment or "-"),
        ("name", run.name or "-"),
        ("status", run.status),
        ("params", format_tags(run.params)),
        ("metrics", ", ".join(f"{key}={value:g}" for key, value in sorted(run.metrics.items())) or "-"),
        ("git", " ".join(filter(None, [run.git.repo, run.git.branch, run.git.commit])) or "-"),
        ("datasets", ", ".join(run.datasets) or "-"),
        ("started", when(run.started_at)),
        ("ended", when(run.ended_at)),
        ("recorded by", run.created_by),
    ]:
        sheet.add_row(key, escape(value))
    console.print(sheet)


# ---------------------------------------------------------------- audit


@audit_app.command("list")
def audit_list(
    resource: Annotated[str, typer.Option(help="Resource name prefix, e.g. models/fraud.")] = "",
    actor: Annotated[str, typer.Option(help="Only this actor.")] = "",
    action: Annotated[str, typer.Option(help="Only this action, e.g. model.alias.set.")] = "",
    since: Annotated[str | None, typer.Option(help="At or after (ISO 8601, or an age: 2h, 7d).")] = None,
    until: Annotated[str | None, typer.Option(help="Before (ISO 8601, or an age).")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many entries.", min=1)] = 100,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List audit entries: who did what to which resource, and why."""
    filters = {
        "resource_prefix": resource,
        "actor": actor,
        "action": action,
        "since": parse_time(since, "--since"),
        "until": parse_time(until, "--until"),
        "page_size": min(limit, 1000),
    }
    with registry(address) as client:
        entries = []
        for entry in client.iter_audit(**filters):
            entries.append(entry)
            if len(entries) >= limit:
                break
    if as_json:
        print_json([to_dict(entry) for entry in entries])
        return
    table = new_table("at", "actor", "action", "resource", "reason")
    for entry in entries:
        table.add_row(when(entry.at), escape(entry.actor), entry.action, escape(entry.resource), escape(entry.reason))
    console.print(table)


# ---------------------------------------------------------------- events


def nats_url_for_events(explicit: str | None) -> str:
    """--nats-url, else MLMESH_NATS_URL, else the NATS of the local mesh, else localhost:4222."""
    if explicit:
        return explicit
    settings = MeshSettings()
    if settings.nats_url:
        return settings.nats_url
    state = launcher.read_state(settings.home.resolve())
    if state and state.nats_url:
        return state.nats_url
    return f"nats://127.0.0.1:{launcher.NATS_DEFAULT_PORT}"


def event_line(event: events.CloudEvent) -> str:
    data = json.dumps(event.data, separators=(",", ":"))
    return f"{event.time}  {event.kind:<20} {event.subject or '-'}  {data}"


async def tail_events(
    url: str,
    kinds: list[str],
    *,
    from_start: bool,
    as_json: bool,
    count: int,
    write: Callable[[str], None],
) -> None:
    """Print events of the MLMESH_EVENTS stream until cancelled or `count` were printed."""
    import nats
    from nats.errors import NoServersError
    from nats.js.api import DeliverPolicy
    from nats.js.errors import NotFoundError

    async def ignore(_error: Exception) -> None:
        """nats-py logs every connection error by default; the CLI reports its own."""

    try:
        connection = await nats.connect(
            url,
            name="mlmesh-events-tail",
            connect_timeout=3,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            error_cb=ignore,
        )
    except (OSError, TimeoutError, NoServersError, nats.errors.Error) as error:
        fail(f"cannot reach NATS at {url} ({error or type(error).__name__}); start the mesh with `mlmesh up`", 2)
    # Fail fast on the first connect, but once tailing, ride out NATS restarts indefinitely.
    connection.options["max_reconnect_attempts"] = -1
    try:
        jetstream = connection.jetstream()
        # One kind filters on the server; several are filtered here, over the whole stream.
        subject = events.subject_of(kinds[0]) if len(kinds) == 1 else events.SUBJECTS
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        waiting_said = False
        while True:
            try:
                subscription = await jetstream.subscribe(
                    subject, stream=events.STREAM, ordered_consumer=True, deliver_policy=policy
                )
                break
            except NotFoundError:
                # The stream appears when the first service connects its outbox relay.
                if not waiting_said:
                    error_console.print(f"waiting for the {events.STREAM} stream to appear on {url} ...")
                    waiting_said = True
                await asyncio.sleep(0.5)
        # On stderr, so scripts reading stdout see only events, and know when tailing began.
        start = "the start of the stream" if from_start else "now on"
        error_console.print(f"watching {events.STREAM} on {url} from {start} (Ctrl-C to stop)", soft_wrap=True)
        printed = 0
        async for message in subscription.messages:
            try:
                event = events.CloudEvent.from_json(message.data)
            except ValueError:
                continue  # not a CloudEvent: nothing an mlmesh subscriber would act on
            if kinds and event.kind not in kinds:
                continue
            write(event.to_json().decode() if as_json else event_line(event))
            printed += 1
            if count and printed >= count:
                return
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


@events_app.command("tail")
def events_tail(
    event_type: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only this kind (model.registered) or type (io.mlmesh.model.registered.v1)."),
    ] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Replay the stream from its first event.")] = False,
    count: Annotated[int, typer.Option(help="Stop after this many events (0: run until Ctrl-C).", min=0)] = 0,
    nats_url: Annotated[
        str | None,
        typer.Option("--nats-url", help="Default: MLMESH_NATS_URL, else the local mesh's NATS.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each CloudEvent as one JSON line.")] = False,
) -> None:
    """Print lifecycle events as they happen (one line each) until Ctrl-C."""
    kinds = [events.kind_of_type(value) for value in event_type or []]
    url = nats_url_for_events(nats_url)

    def write(line: str) -> None:
        typer.echo(line)  # plain echo: one unwrapped line per event, flushed for pipes

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await tail_events(url, kinds, from_start=from_start, as_json=as_json, count=count, write=write)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


# ---------------------------------------------------------------- deploy

DeployerOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the deployer. Default: MLMESH_DEPLOYER_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_DEPLOYER_PORT (50054).",
        show_default=False,
    ),
]
# A docker deployment's first image build takes minutes.
DEPLOY_WAIT_SECONDS = 900


def deployment_status(status: int) -> str:
    return deployer_pb2.DeploymentStatus.Name(status).removeprefix("DEPLOYMENT_STATUS_")


def endpoint_dict(endpoint: deployer_pb2.Endpoint) -> dict[str, Any]:
    """An endpoint as JSON: the proto's fields, plus each deployment's `model`, `version` and
    a short `status`."""
    data = to_dict(endpoint)
    for deployment, proto in zip(data["deployments"], endpoint.deployments, strict=True):
        deployment["model"] = proto.model_name
        deployment["version"] = proto.model_version
        deployment["status"] = deployment_status(proto.status)
        for replica, state in zip(deployment["replica_states"], proto.replica_states, strict=True):
            replica["status"] = deployer_pb2.ReplicaStatus.Name(state.status).removeprefix("REPLICA_STATUS_")
    return data


def show_endpoint(endpoint: deployer_pb2.Endpoint) -> None:
    console.print(f"[bold]{escape(endpoint.name)}[/bold]  grpc {endpoint.grpc_address}  http {endpoint.http_address}")
    table = new_table("deployment", "model", "status", "traffic", "mirror", "target", "cpus", "memory", "replicas")
    for deployment in endpoint.deployments:
        ready = sum(r.status == deployer_pb2.REPLICA_STATUS_READY for r in deployment.replica_states)
        table.add_row(
            escape(deployment.name),
            escape(f"{deployment.model_name}:{deployment.model_version}"),
            deployment_status(deployment.status),
            f"{deployment.traffic}%",
            f"{deployment.mirror}%" if deployment.mirror else "-",
            deployment.target,
            f"{deployment.resources.cpus:g}" if deployment.resources.cpus else "-",
            f"{deployment.resources.memory_mb} MiB" if deployment.resources.memory_mb else "-",
            f"{ready}/{deployment.replicas}",
        )
    console.print(table)
    for deployment in endpoint.deployments:
        if deployment.resources.profile:
            batching = deployment.resources.max_batch_rows
            console.print(
                f"{escape(deployment.name)}: resources recommended by {deployment.resources.profile}"
                + (f" (batching up to {batching} rows)" if batching else "")
            )
        if deployment.message:
            console.print(f"{escape(deployment.name)}: {escape(deployment.message)}")


def parse_percentages(values: list[str] | None, option: str) -> dict[str, int]:
    result = {}
    for name, value in parse_pairs(values, option).items():
        if not value.isdigit():
            fail(f"{option} {name}={value}: give a whole percentage, e.g. {name}=10", 2)
        result[name] = int(value)
    return result


@deploy_app.command("create")
def deploy_create(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name (created if new): lowercase letters, digits, '-'.")],
    model_ref: Annotated[str, typer.Argument(help="name:version, name@alias (resolved now), or name for the latest.")],
    deployment: Annotated[str, typer.Option("--deployment", help="Deployment name within the endpoint.")] = "blue",
    target: Annotated[str, typer.Option(help="local (processes here), docker or kubernetes.")] = "local",
    traffic: Annotated[
        int | None,
        typer.Option(
            min=0, max=100, help="Percent of traffic. Default: 100 for a new endpoint, else 0.", show_default=False
        ),
    ] = None,
    cpus: Annotated[float, typer.Option(min=0, help="CPU cores per replica (0: no limit).")] = 0,
    memory: Annotated[int, typer.Option("--memory", min=0, help="Memory per replica in MiB (0: no limit).")] = 0,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="How many copies serve the deployment (default 1).", show_default=False)
    ] = None,
    resources: Annotated[
        str,
        typer.Option(
            "--resources",
            help="`recommended`: cpus, memory, batching and (unless --replicas) replicas from the version's newest "
            "profile on the target (`mlmesh profile`).",
        ),
    ] = "",
    capture: Annotated[bool, typer.Option(help="Capture requests and answers to MLMESH_CAPTURE.")] = False,
    image: Annotated[
        str,
        typer.Option(help="docker target: an image serving the model (default: the builder builds one)."),
    ] = "",
    wait: Annotated[bool, typer.Option(help="Wait until the deployment is ready (or failed).")] = True,
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deploy a model version to an endpoint and wait until it serves."""
    if resources not in ("", "recommended"):
        fail(f"--resources takes `recommended`, not {resources!r}", 2)
    recommended = resources == "recommended"
    with deployer(address) as client:
        client.create(
            endpoint,
            model_ref,
            deployment=deployment,
            target=target,
            cpus=cpus,
            memory_mb=memory,
            replicas=replicas or (0 if recommended else 1),
            traffic=traffic,
            capture=capture,
            image=image,
            recommended_resources=recommended,
        )
        result = client.get(endpoint)
        if wait:
            result = wait_for_deployment(client, endpoint, deployment, quiet=as_json)
    if as_json:
        print_json(endpoint_dict(result))
    else:
        show_endpoint(result)
    state = {d.name: d for d in result.deployments}[deployment]
    if state.status == deployer_pb2.DEPLOYMENT_STATUS_FAILED:
        fail(f"{endpoint}/{deployment} failed: {state.message} (see `mlmesh deploy logs {endpoint} {deployment}`)")


def wait_for_deployment(client: DeployerClient, endpoint: str, deployment: str, quiet: bool) -> deployer_pb2.Endpoint:
    settled = (deployer_pb2.DEPLOYMENT_STATUS_READY, deployer_pb2.DEPLOYMENT_STATUS_FAILED)
    deadline = time.monotonic() + DEPLOY_WAIT_SECONDS
    with contextlib.ExitStack() as stack:
        spinner = None if quiet else stack.enter_context(error_console.status(f"deploying {endpoint}/{deployment}"))
        while True:
            result = client.get(endpoint)
            state = {d.name: d for d in result.deployments}[deployment]
            if state.status in settled or time.monotonic() > deadline:
                return result
            if spinner is not None:
                ready = sum(r.status == deployer_pb2.REPLICA_STATUS_READY for r in state.replica_states)
                doing = f" ({state.message[:100]})" if state.message else ""
                spinner.update(f"deploying {endpoint}/{deployment}: {ready}/{state.replicas} replicas ready{doing}")
            time.sleep(0.3)


@deploy_app.command("show")
def deploy_show(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name.")],
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an endpoint: its addresses, traffic, and each deployment with its replicas."""
    with deployer(address) as client:
        result = client.get(endpoint)
    if as_json:
        print_json(endpoint_dict(result))
    else:
        show_endpoint(result)


@deploy_app.command("list")
def deploy_list(address: DeployerOption = None, as_json: JsonOption = False) -> None:
    """List the endpoints with their deployments."""
    with deployer(address) as client:
        endpoints = client.list()
    if as_json:
        print_json([endpoint_dict(endpoint) for endpoint in endpoints])
        return
    table = new_table("endpoint", "grpc", "http", "deployments")
    for endpoint in endpoints:
        deployments = ", ".join(
            f"{d.name} {d.model_name}:{d.model_version} {d.traffic}% {deployment_status(d.status)}"
            for d in endpoint.deployments
        )
        table.add_row(escape(endpoint.name), endpoint.grpc_address, endpoint.http_address, escape(deployments))
    console.print(table)


@deploy_app.command("traffic")
def deploy_traffic(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name.")],
    weights: Annotated[
        list[str], typer.Argument(help="deployment=percent pairs summing to 100, e.g. blue=90 green=10.")
    ],
    mirror: Annotated[
        list[str] | None,
        typer.Option(
            "--mirror", help="deployment=percent of requests copied to it (answers discarded).", show_default=False
        ),
    ] = None,
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set the traffic weights (and mirror percentages) of an endpoint's deployments at once."""
    traffic = parse_percentages(weights, "weights")
    copies = parse_percentages(mirror, "--mirror")
    with deployer(address) as client:
        result = client.set_traffic(endpoint, traffic, copies)
    if as_json:
        print_json(endpoint_dict(result))
    else:
        show_endpoint(result)


@deploy_app.command("delete")
def deploy_delete(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name.")],
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Delete only this deployment (it must take no traffic).")
    ] = None,
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete an endpoint (or one of its deployments); returns once its replicas have stopped."""
    with deployer(address) as client:
        client.delete(endpoint, deployment)
    if as_json:
        print_json({"endpoint": endpoint, "deployment": deployment, "deleted": True})
    else:
        console.print(f"deleted {escape(endpoint + ('/' + deployment if deployment else ''))}")


@deploy_app.command("logs")
def deploy_logs(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name.")],
    deployment: Annotated[str, typer.Argument(help="Deployment name.")] = "blue",
    replica: Annotated[int, typer.Option(min=0, help="Which replica.")] = 0,
    lines: Annotated[int, typer.Option(min=1, max=10_000, help="How many lines from the end.")] = 100,
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the end of a replica's log."""
    with deployer(address) as client:
        found = client.logs(endpoint, deployment, replica, lines)
    if as_json:
        print_json({"endpoint": endpoint, "deployment": deployment, "replica": replica, "lines": found})
    else:
        for line in found:
            typer.echo(line)


@app.command()
def predict(
    endpoint: Annotated[str, typer.Argument(help="Endpoint name.")],
    data: Annotated[
        str | None,
        typer.Option(
            "--json",
            help="Rows as JSON ([[1, 2, 3], ...] for the model's one input, or {input: rows}), or a whole "
            "Open Inference Protocol request ({\"inputs\": [...]}). '-' reads stdin.",
            show_default=False,
        ),
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="A CSV file of rows (a header row is skipped).", show_default=False)
    ] = None,
    version: Annotated[str, typer.Option(help="Pin the model version (default: the traffic weights choose).")] = "",
    address: DeployerOption = None,
) -> None:
    """Send rows to an endpoint over the Open Inference Protocol (REST) and print its JSON answer."""
    if (data is None) == (csv_file is None):
        fail("give the rows with exactly one of --json DATA or --csv FILE", 2)
    with deployer(address) as client:
        http_address = client.get(endpoint).http_address
    base = f"http://{http_address}/v2/models/{endpoint}" + (f"/versions/{version}" if version else "")
    try:
        metadata = http_json(base, None)
        body = inference_body(metadata, data, csv_file)
        answer = http_json(f"{base}/infer", body)
    except (OSError, ValueError) as error:
        fail(str(error))
    print_json(answer)


def http_json(url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """GET (or POST `body` to) an OIP REST URL; its JSON answer, or its error as ValueError."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise ValueError(f"{error.code}: {detail}") from None


def inference_body(metadata: dict[str, Any], data: str | None, csv_file: Path | None) -> dict[str, Any]:
    """An OIP request body from JSON rows, a ready request, or a CSV file."""
    if csv_file is not None:
        with csv_file.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]
        parsed: Any = [[float(value) for value in row] for row in rows]
    else:
        assert data is not None
        parsed = json.loads(sys.stdin.read() if data == "-" else data)
    if isinstance(parsed, dict) and "inputs" in parsed:
        return parsed
    inputs = metadata.get("inputs", [])
    by_name = parsed if isinstance(parsed, dict) else None
    if by_name is None:
        if len(inputs) != 1:
            names = ", ".join(i["name"] for i in inputs)
            raise ValueError(f"the model has inputs {names}; give rows per input as {{name: rows}}")
        by_name = {inputs[0]["name"]: parsed}
    tensors = []
    for spec in inputs:
        if spec["name"] not in by_name:
            raise ValueError(f"no rows for input {spec['name']}")
        rows = by_name[spec["name"]]
        shape = [len(rows), *([len(rows[0])] if rows and isinstance(rows[0], list) else [])]
        flat = [value for row in rows for value in (row if isinstance(row, list) else [row])]
        tensors.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": flat})
    return {"inputs": tensors}


def _numeric(row: list[str]) -> bool:
    try:
        [float(value) for value in row]
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- batch


def batch_status(status: int) -> str:
    return deployer_pb2.BatchJobStatus.Name(status).removeprefix("BATCH_JOB_STATUS_")


def batch_dict(job: deployer_pb2.BatchJob) -> dict[str, Any]:
    data = to_dict(job)
    data["status"] = batch_status(job.status)
    return data


def show_batch(job: deployer_pb2.BatchJob) -> None:
    scorer = f"{job.model_name}:{job.model_version}" if job.model_name else f"endpoint {job.endpoint}"
    rows = [
        ("job", job.id),
        ("status", batch_status(job.status)),
        ("scored by", scorer),
        ("inputs", ", ".join(job.inputs)),
        ("output", job.output_dir),
        ("progress", f"{job.parts_done}/{job.parts_total} mini-batches of {job.mini_batch_rows} rows"),
        ("rows", str(job.rows_total)),
        ("workers", str(job.workers)),
        ("created", when(job.created_at)),
        ("finished", when(job.finished_at)),
    ]
    if job.message:
        rows.append(("message", job.message))
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold")
    sheet.add_column()
    for key, value in rows:
        sheet.add_row(key, escape(value))
    console.print(sheet)


@batch_app.command("run")
def batch_run(
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Parquet or CSV files to score (read by the deployer).")
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="Or: a registered dataset (name:version, or name for the latest) to score.")
    ] = "",
    *,
    output: Annotated[Path, typer.Option("--output", "-o", help="An empty or new folder for the Parquet parts.")],
    model_ref: Annotated[
        str, typer.Option("--model", help="name:version or name@alias to score with (in the workers).")
    ] = "",
    endpoint: Annotated[str, typer.Option(help="Or: an endpoint to send the rows to.")] = "",
    mini_batch_rows: Annotated[int, typer.Option(min=1, help="Rows per mini-batch (one output part each).")] = 1000,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Worker processes.")] = 2,
    column: Annotated[
        list[str] | None,
        typer.Option("--column", help="An input column, in order; repeat. Default: every numeric column."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = True,
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Score files in batch: mini-batches go through a work queue to worker processes, each
    writing one Parquet part; a killed worker's mini-batches are redone by the others."""
    with deployer(address) as client:
        job = client.create_batch(
            inputs or [],
            output,
            dataset=dataset,
            model_ref=model_ref,
            endpoint=endpoint,
            mini_batch_rows=mini_batch_rows,
            workers=workers,
            columns=column or [],
        )
        if wait:
            job = follow_batch(client, job.id, quiet=as_json)
    if as_json:
        print_json(batch_dict(job))
    else:
        show_batch(job)
    if job.status == deployer_pb2.BATCH_JOB_STATUS_FAILED:
        fail(f"batch job {job.id} failed: {job.message}")


def follow_batch(client: DeployerClient, job_id: str, quiet: bool) -> deployer_pb2.BatchJob:
    """Poll a job until it ends, with a progress bar of mini-batches on stderr."""
    ended = (deployer_pb2.BATCH_JOB_STATUS_COMPLETED, deployer_pb2.BATCH_JOB_STATUS_FAILED)
    with progress_bar(
        TextColumn("{task.completed}/{task.total} mini-batches"), TimeRemainingColumn(), quiet=quiet
    ) as progress:
        task = progress.add_task(f"batch {job_id}", total=None)
        while True:
            job = client.get_batch(job_id)
            progress.update(task, completed=job.parts_done, total=job.parts_total or None)
            if job.status in ended:
                return job
            time.sleep(0.3)


@batch_app.command("show")
def batch_show(
    job_id: Annotated[str, typer.Argument(help="The job id that `batch run` printed.")],
    address: DeployerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a batch job: status, progress, rows, output folder."""
    with deployer(address) as client:
        job = client.get_batch(job_id)
    if as_json:
        print_json(batch_dict(job))
    else:
        show_batch(job)


@batch_app.command("list")
def batch_list(address: DeployerOption = None, as_json: JsonOption = False) -> None:
    """List batch jobs, newest first."""
    with deployer(address) as client:
        jobs = client.list_batches()
    if as_json:
        print_json([batch_dict(job) for job in jobs])
        return
    table = new_table("job", "status", "scored by", "progress", "rows", "output", "created")
    for job in jobs:
        table.add_row(
            job.id,
            batch_status(job.status),
            escape(f"{job.model_name}:{job.model_version}" if job.model_name else job.endpoint),
            f"{job.parts_done}/{job.parts_total}",
            str(job.rows_total),
            escape(job.output_dir),
            when(job.created_at),
        )
    console.print(table)


# ---------------------------------------------------------------- env and build

BuilderOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the builder. Default: MLMESH_BUILDER_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_BUILDER_PORT (50052).",
        show_default=False,
    ),
]


def environment_dict(environment: builder_pb2.Environment) -> dict[str, Any]:
    return to_dict(environment)


def show_environment(environment: builder_pb2.Environment, created: bool | None = None) -> None:
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold")
    sheet.add_column()
    note = "" if created is None else ("  (new)" if created else "  (same spec as before: existing version)")
    sheet.add_row("environment", escape(f"{environment.name}:{environment.version}") + note)
    sheet.add_row("python", environment.python_version)
    sheet.add_row("base image", escape(environment.base_image or "(the builder's default)"))
    sheet.add_row("requirements", escape(", ".join(environment.requirements) or "-"))
    sheet.add_row("created", f"{when(environment.created_at)} by {escape(environment.created_by or '-')}")
    console.print(sheet)
    table = new_table("package", "version", "sha256")
    for package in environment.lock:
        table.add_row(escape(package.name), escape(package.version), package.sha256)
    console.print(table)


@env_app.command("register")
def env_register(
    name: Annotated[str, typer.Argument(help="Environment name; versions count up per name.")],
    requirements: Annotated[
        Path, typer.Argument(help="A requirements file: one requirement a line (no -r, -e, URLs or paths).")
    ],
    python: Annotated[str, typer.Option("--python", help="Python version the lock is for.")] = "3.11",
    base_image: Annotated[
        str, typer.Option("--base-image", help="Base image of images built with it. Default: the builder's.")
    ] = "",
    description: Annotated[str, typer.Option(help="What the environment is for.")] = "",
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register an environment: the requirements are resolved by pip to exact versions and hashes.
    Registering the same spec again returns the existing version."""
    try:
        text = requirements.read_text()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read {requirements}: {error}")
    with builder(address) as client:
        with contextlib.ExitStack() as stack:
            if not as_json:
                stack.enter_context(error_console.status(f"resolving {name} with pip"))
            environment, created = client.register_environment(
                name, text, python_version=python, base_image=base_image, description=description
            )
    if as_json:
        print_json(environment_dict(environment) | {"created": created})
    else:
        show_environment(environment, created)


@env_app.command("show")
def env_show(
    ref: Annotated[str, typer.Argument(help="name:version, or name for the latest version.")],
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an environment version with its lock."""
    with builder(address) as client:
        environment = client.get_environment(ref)
    if as_json:
        print_json(environment_dict(environment))
    else:
        show_environment(environment)


@env_app.command("list")
def env_list(
    prefix: Annotated[str, typer.Option("--prefix", help="Only names starting with this.")] = "",
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """List environment versions."""
    with builder(address) as client:
        environments = client.list_environments(prefix)
    if as_json:
        print_json([environment_dict(environment) for environment in environments])
        return
    table = new_table("environment", "python", "packages", "base image", "created")
    for environment in environments:
        table.add_row(
            escape(f"{environment.name}:{environment.version}"),
            environment.python_version,
            str(len(environment.lock)),
            escape(environment.base_image or "-"),
            when(environment.created_at),
        )
    console.print(table)


def conversion_dict(conversion: builder_pb2.Conversion) -> dict[str, Any]:
    """A conversion as JSON, with its headline figures also at the top level."""
    data = to_dict(conversion)
    data |= {
        "max_abs_diff": conversion.parity.max_abs_diff,
        "labels_equal": conversion.parity.labels_equal,
        "speedup_one_row": conversion.speed.speedup_one_row,
        "speedup_1000_rows": conversion.speed.speedup_1000_rows,
    }
    return data


def show_conversion(conversion: builder_pb2.Conversion) -> None:
    speed = conversion.speed
    console.print(
        f"{escape(conversion.source_name)}:{conversion.source_version} ({escape(conversion.estimator)}) -> "
        f"[bold]{escape(conversion.source_name)}:{conversion.version}[/bold] (onnx)"
    )
    console.print(
        f"parity: {conversion.parity.rows_checked} rows, labels "
        f"{'equal' if conversion.parity.labels_equal else 'DIFFER'}, max abs diff {conversion.parity.max_abs_diff:.2e}"
    )
    table = new_table("", "native", "onnxruntime", "speedup")
    table.add_row(
        "1 row", f"{speed.native_one_row_ms:.3f} ms", f"{speed.onnx_one_row_ms:.3f} ms", f"{speed.speedup_one_row:.1f}x"
    )
    table.add_row(
        "1,000 rows",
        f"{speed.native_1000_rows_ms:.3f} ms",
        f"{speed.onnx_1000_rows_ms:.3f} ms",
        f"{speed.speedup_1000_rows:.1f}x",
    )
    console.print(table)
    if conversion.quantized:
        console.print(
            f"quantised: {conversion.quantization_label_agreement:.1%} of labels unchanged, "
            f"max abs diff {conversion.quantization_max_abs_diff:.2e}"
        )


@build_app.command("convert")
def build_convert(
    ref: Annotated[str, typer.Argument(help="A scikit-learn, XGBoost or LightGBM version: name:version, name@alias.")],
    sample_dataset: Annotated[
        str,
        typer.Option(
            "--sample-dataset",
            help="Check parity on a registered dataset (name:version). Default: the version's input example, "
            "else rows generated from the model.",
        ),
    ] = "",
    quantize: Annotated[bool, typer.Option(help="Dynamic int8 quantisation (neural networks only).")] = False,
    optimize: Annotated[bool, typer.Option(help="Apply onnxruntime's offline graph optimisation.")] = True,
    parity_rows: Annotated[int, typer.Option(min=0, help="Sample rows the parity check uses (0: 1,000).")] = 0,
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Convert a model version to ONNX, check that it answers as the original does, and register it
    as the model's next version (framework onnx, parent = the source version)."""
    with builder(address) as client:
        with contextlib.ExitStack() as stack:
            if not as_json:
                stack.enter_context(error_console.status(f"converting {ref} and checking parity"))
            conversion = client.convert(
                ref, sample_dataset=sample_dataset, quantize=quantize, optimize=optimize, parity_rows=parity_rows
            )
    if as_json:
        print_json(conversion_dict(conversion))
    else:
        show_conversion(conversion)


def image_dict(image: builder_pb2.Image) -> dict[str, Any]:
    """An image as JSON; `image` is the tag."""
    return to_dict(image) | {"image": image.tag}


BUILD_STEP = re.compile(r"Step (\d+)/(\d+)")


@build_app.command("image")
def build_image(
    refs: Annotated[list[str], typer.Argument(help="Model versions to serve (each with an .onnx file).")],
    environment: Annotated[
        str, typer.Option("--env", help="Environment name:version whose lock is installed in the image.")
    ] = "",
    base_image: Annotated[str, typer.Option("--base-image", help="Base image (CPython with venv).")] = "",
    tag: Annotated[str, typer.Option("--tag", help="Image tag. Default: mlmesh-model-<name>:<version>-<key>.")] = "",
    setting: Annotated[
        list[str] | None,
        typer.Option("--setting", help="A runtime setting baked in, e.g. max_batch_rows=16; repeat for more."),
    ] = None,
    push: Annotated[bool, typer.Option(help="Push to the builder's registry (MLMESH_BUILDER_PUSH_REGISTRY).")] = False,
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build a Docker image that serves the model versions over the Open Inference Protocol
    (gRPC 8001, REST 8000). The same models, environment and runtime reuse an existing image."""
    settings = parse_pairs(setting, "--setting")
    with builder(address) as client:
        with progress_bar(TextColumn("{task.fields[step]}"), TimeElapsedColumn(), quiet=as_json) as progress:
            task = progress.add_task("preparing", total=None, step="")

            def on_log(line: str) -> None:
                """Docker's `Step N/M` lines move the bar; the steps before it (wheels, context) show as text."""
                line = line.strip()
                if not line:
                    return
                step = BUILD_STEP.match(line)
                if step:
                    done, total = int(step.group(1)), int(step.group(2))
                    progress.update(task, description="docker build", completed=done - 1, total=total)
                    progress.update(task, step=f"step {done}/{total}")
                    if not as_json:
                        progress.console.print(escape(line[:200]), style="dim")
                elif progress.tasks[0].total is None:
                    progress.update(task, description=escape(line[:80]))

            image = client.build_image(
                refs,
                environment=environment,
                base_image=base_image,
                runtime_settings=settings,
                tag=tag,
                push=push,
                on_log=on_log,
            )
    if as_json:
        print_json(image_dict(image))
        return
    reused = "reused (nothing changed)" if image.reused else f"built in {image.seconds:.0f} s"
    console.print(f"[bold]{escape(image.tag)}[/bold]  {image.image_id}  {human_size(image.size_bytes)}  {reused}")
    if image.pushed:
        console.print(f"pushed: {escape(image.pushed)}")


@build_app.command("list")
def build_list(
    name: Annotated[str, typer.Option("--name", help="Only images serving this model.")] = "",
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """List built images, newest first."""
    with builder(address) as client:
        images = client.list_images(name)
    if as_json:
        print_json([image_dict(image) for image in images])
        return
    table = new_table("image", "models", "environment", "size", "created")
    for image in images:
        table.add_row(
            escape(image.tag),
            escape(", ".join(image.models)),
            escape(image.environment or "-"),
            human_size(image.size_bytes),
            when(image.created_at),
        )
    console.print(table)


@build_app.command("export")
def build_export(
    image: Annotated[str, typer.Argument(help="An image tag, or a model version whose latest image is meant.")],
    file: Annotated[Path, typer.Argument(help="Where to write the archive (load it with `docker load -i FILE`).")],
    address: BuilderOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a `docker save` archive of an image, for machines without registry access."""
    with builder(address) as client, transfer_progress(f"exporting {image}", not as_json) as progress:
        size = client.export_image(image, file, progress)
    if as_json:
        print_json({"image": image, "file": str(file), "size_bytes": size})
    else:
        console.print(
            f"wrote {escape(str(file))} ({human_size(size)}); load it with `docker load -i {escape(str(file))}`"
        )


# ---------------------------------------------------------------- drift

DriftOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the drift service. Default: MLMESH_DRIFT_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_DRIFT_PORT (50056).",
        show_default=False,
    ),
]
# The score that decides each kind of feature, shown in tables and charts.
MAIN_SCORE = {"numeric": "wasserstein", "categorical": "js_distance"}


def split_names(values: list[str] | None) -> list[str]:
    """Repeated options, each possibly comma-separated, as one list."""
    return [name.strip() for value in values or () for name in value.split(",") if name.strip()]


def monitor_dict(monitor: drift_pb2.Monitor) -> dict[str, Any]:
    return to_dict(monitor)


def result_dict(result: drift_pb2.DriftResult) -> dict[str, Any]:
    """A check as JSON: the proto's fields, with `features` a map from feature name to its scores."""
    data = to_dict(result)
    data["features"] = {feature["name"]: feature for feature in data["features"]}
    return data


def show_result(result: drift_pb2.DriftResult) -> None:
    verdict = "[red]drift detected[/red]" if result.drift_detected else "no drift detected"
    if result.drifted and not result.drift_detected:
        verdict += " (this window drifted; not yet for the monitor's consecutive windows)"
    console.print(
        f"[bold]{escape(result.monitor)}[/bold]  {verdict}  {result.rows} rows  "
        f"{when(result.window_start)} .. {when(result.window_end)}  coefficient {result.drift_coefficient:.3f}"
    )
    feature_table(result_dict(result)["features"])


def feature_table(features: dict[str, dict[str, Any]]) -> None:
    """Per-feature drift as a table: features by name, each as in result_dict or feature_dict."""
    table = new_table("feature", "kind", "drifted", "score", "p (adjusted)", "missing", "note")
    for name, found in features.items():
        score_name = MAIN_SCORE.get(found.get("kind", ""), "wasserstein")
        score = f"{score_name} {found[score_name]:.4f}" if found.get(score_name) is not None else "-"
        if found.get("kind") == "numeric" and found.get("psi") is not None:
            score += f", psi {found['psi']:.4f}"
        unseen = [str(category) for category in found.get("unseen_categories") or ()]
        table.add_row(
            escape(name),
            found.get("kind", ""),
            "[red]yes[/red]" if found.get("drifted") else "no",
            score,
            f"{found['p_value_adjusted']:.3g}" if found.get("p_value_adjusted") is not None else "-",
            f"{found.get('missing_rate') or 0:.1%}",
            escape(found.get("note") or (unseen and "unseen: " + ", ".join(unseen[:5])) or ""),
        )
    console.print(table)


@monitor_app.command("create")
def drift_monitor_create(
    name: Annotated[str, typer.Argument(help="Monitor name: lowercase letters, digits and '-'.")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="The endpoint whose captured requests are checked.")] = "",
    model: Annotated[str, typer.Option("--model", help="Or a model: the captures of every endpoint serving it.")] = "",
    baseline: Annotated[
        str, typer.Option("--baseline", help="A registered dataset name:version (the training data).")
    ] = "",
    baseline_since: Annotated[
        str | None,
        typer.Option(
            "--baseline-since",
            help="Instead: a captured window of the endpoint, from (ISO time or age).",
            show_default=False,
        ),
    ] = None,
    baseline_until: Annotated[
        str | None, typer.Option("--baseline-until", help="... to (ISO time or age; default now).", show_default=False)
    ] = None,
    window_rows: Annotated[int, typer.Option("--window-rows", min=0, help="Check the last N captured rows.")] = 0,
    window: Annotated[
        str | None, typer.Option("--window", help="Or the captures of the last period (1h, 1d).", show_default=False)
    ] = None,
    features: Annotated[
        list[str] | None,
        typer.Option(
            "--features",
            help="Features to check (comma-separated or repeated): captured column names, or captured=baseline "
            "pairs. Default: every baseline column.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Baseline columns to leave out (an id, the label).", show_default=False),
    ] = None,
    schedule: Annotated[
        str | None, typer.Option("--schedule", help="Check on its own every period (1h); default: only when asked.")
    ] = None,
    consecutive: Annotated[
        int, typer.Option(min=1, max=100, help="Detect drift only after this many drifted windows in a row.")
    ] = 1,
    wasserstein: Annotated[float, typer.Option(min=0, help="Normalised Wasserstein threshold (0: 0.1).")] = 0,
    psi: Annotated[float, typer.Option(min=0, help="PSI threshold (0: 0.2).")] = 0,
    js_distance: Annotated[float, typer.Option("--js-distance", min=0, help="Jensen-Shannon threshold (0: 0.1).")] = 0,
    alpha: Annotated[float, typer.Option(min=0, max=1, help="Significance after correction (0: 0.05).")] = 0,
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a monitor: summarise the baseline once; checks then compare captured windows with it."""
    window_span = None
    if baseline_since:
        start = parse_time(baseline_since, "--baseline-since")
        end = parse_time(baseline_until, "--baseline-until") or datetime.now(UTC)
        assert start is not None
        window_span = (start.timestamp(), end.timestamp())
    thresholds = {"wasserstein": wasserstein, "psi": psi, "js_distance": js_distance, "alpha": alpha}
    with (
        drift(address) as client,
        error_console.status(f"summarising the baseline of {name}", spinner="dots")
        if not as_json
        else contextlib.nullcontext(),
    ):
        monitor = client.create_monitor(
            name,
            endpoint,
            model=model,
            baseline_dataset=baseline,
            baseline_window=window_span,
            features=split_names(features),
            exclude=split_names(exclude),
            window_rows=window_rows,
            window_seconds=parse_duration(window, "--window"),
            schedule_seconds=parse_duration(schedule, "--schedule"),
            thresholds=thresholds,
            consecutive=consecutive,
        )
    if as_json:
        print_json(monitor_dict(monitor))
    else:
        show_monitor(monitor)


def show_monitor(monitor: drift_pb2.Monitor) -> None:
    window = f"last {monitor.window_rows} rows" if monitor.window_rows else f"last {monitor.window_seconds:g} s"
    schedule = f"every {monitor.schedule_seconds:g} s" if monitor.schedule_seconds else "when asked"
    console.print(
        f"[bold]{escape(monitor.name)}[/bold]  "
        f"{'endpoint ' + escape(monitor.endpoint) if monitor.endpoint else 'model ' + escape(monitor.model)}  baseline "
        f"{escape(monitor.baseline)} ({monitor.baseline_rows} rows)  window {window}  checks {schedule}"
    )
    table = new_table("feature", "baseline column", "kind")
    for name, column in sorted(monitor.features.items()):
        table.add_row(escape(name), escape(column), monitor.kinds.get(name, ""))
    console.print(table)


@monitor_app.command("list")
def drift_monitor_list(
    endpoint: Annotated[str, typer.Option("--endpoint", help="Only this endpoint's monitors.")] = "",
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the monitors."""
    with drift(address) as client:
        monitors = client.list_monitors(endpoint)
    if as_json:
        print_json([monitor_dict(monitor) for monitor in monitors])
        return
    table = new_table("monitor", "endpoint", "baseline", "features", "last checked")
    for monitor in monitors:
        table.add_row(
            escape(monitor.name),
            escape(monitor.endpoint or f"model {monitor.model}"),
            escape(monitor.baseline),
            str(len(monitor.features)),
            when(monitor.last_checked_at),
        )
    console.print(table)


@monitor_app.command("show")
def drift_monitor_show(
    name: Annotated[str, typer.Argument(help="Monitor name.")],
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a monitor: its baseline, window, schedule and features."""
    with drift(address) as client:
        monitor = client.get_monitor(name)
    if as_json:
        print_json(monitor_dict(monitor))
    else:
        show_monitor(monitor)


@monitor_app.command("delete")
def drift_monitor_delete(
    name: Annotated[str, typer.Argument(help="Monitor name.")],
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a monitor and its results."""
    with drift(address) as client:
        client.delete_monitor(name)
    if as_json:
        print_json({"name": name, "deleted": True})
    else:
        console.print(f"deleted monitor {escape(name)}")


@drift_app.command("check")
def drift_check(
    name: Annotated[str, typer.Argument(help="Monitor name.")],
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check the monitor's latest window now; prints drift_detected, rows and each feature's scores."""
    with drift(address) as client:
        result = client.check(name)
    if as_json:
        print_json(result_dict(result))
    else:
        show_result(result)


@drift_app.command("results")
def drift_results(
    name: Annotated[str, typer.Argument(help="Monitor name.")],
    limit: Annotated[int, typer.Option(min=0, help="At most this many, newest first (0: all).")] = 50,
    chart: Annotated[
        Path | None,
        typer.Option("--chart", help="Write a chart per feature over time: FILE.html (or .png with matplotlib)."),
    ] = None,
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a monitor's checks, newest first; optionally chart each feature's score over time."""
    with drift(address) as client:
        results = client.results(name, limit)
        monitor = client.get_monitor(name) if chart else None
    if chart is not None and monitor is not None:
        write_drift_chart(chart, monitor, list(reversed(results)))
    if as_json:
        print_json([result_dict(result) for result in results])
        return
    table = new_table("checked", "window end", "rows", "drift", "coefficient", "drifted features")
    for result in results:
        drift_text = "[red]detected[/red]" if result.drift_detected else ("window" if result.drifted else "no")
        table.add_row(
            when(result.checked_at),
            when(result.window_end),
            str(result.rows),
            drift_text,
            f"{result.drift_coefficient:.3f}",
            escape(", ".join(result.drifted_features)),
        )
    console.print(table)
    if chart is not None:
        console.print(f"chart: {escape(str(chart))}")


def write_drift_chart(path: Path, monitor: drift_pb2.Monitor, results: list[drift_pb2.DriftResult]) -> None:
    """One small line chart per feature of its deciding score over the checks, with the threshold."""
    thresholds = {"wasserstein": monitor.thresholds.wasserstein, "js_distance": monitor.thresholds.js_distance}
    series: dict[str, list[tuple[float, float, bool]]] = {}
    kinds: dict[str, str] = {}
    for result in results:
        moment = result.window_end.seconds + result.window_end.nanos / 1e9
        for feature in result.features:
            score_name = MAIN_SCORE.get(feature.kind, "wasserstein")
            kinds[feature.name] = score_name
            if feature.HasField(score_name):
                series.setdefault(feature.name, []).append((moment, getattr(feature, score_name), feature.drifted))
    if path.suffix.lower() == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            fail("a PNG chart needs matplotlib (pip install matplotlib); or write --chart FILE.html", 2)
        figure, axes = plt.subplots(max(1, len(series)), 1, figsize=(8, 2 * max(1, len(series))), squeeze=False)
        for axis, (feature, points) in zip(axes[:, 0], sorted(series.items()), strict=False):
            moments = [datetime.fromtimestamp(moment, UTC) for moment, _, _ in points]
            axis.plot(moments, [score for _, score, _ in points], marker="o")
            axis.axhline(thresholds[kinds[feature]], color="red", linestyle="--")
            axis.set_title(f"{feature} ({kinds[feature]})", fontsize=9)
        figure.tight_layout()
        figure.savefig(path)
        return
    if path.suffix.lower() != ".html":
        fail("--chart takes a .html or .png file", 2)
    path.write_text(drift_chart_html(monitor.name, series, kinds, thresholds))


def minute(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="minutes").replace("+00:00", "Z")


def drift_chart_html(
    title: str, series: dict[str, list[tuple[float, float, bool]]], kinds: dict[str, str], thresholds: dict[str, float]
) -> str:
    """A self-contained HTML page of SVG line charts (no script, no network)."""
    width, height, pad = 560, 140, 30
    parts = [
        "<!doctype html><meta charset=utf-8>",
        f"<title>drift: {html.escape(title)}</title>",
        "<style>body{font:13px sans-serif;margin:20px}h2{font-size:14px;margin:18px 0 4px}</style>",
        f"<h1 style='font-size:16px'>drift of {html.escape(title)}</h1>",
    ]
    for feature, points in sorted(series.items()):
        threshold = thresholds[kinds[feature]]
        top = max([threshold * 1.5, *(score for _, score, _ in points)]) or 1.0
        first, last = points[0][0], points[-1][0]
        span = (last - first) or 1.0

        def x(moment: float, first: float = first, span: float = span) -> float:
            return pad + (moment - first) / span * (width - 2 * pad)

        def y(score: float, top: float = top) -> float:
            return height - pad - score / top * (height - 2 * pad)

        line = " ".join(f"{x(moment):.1f},{y(score):.1f}" for moment, score, _ in points)
        dots = "".join(
            f"<circle cx='{x(moment):.1f}' cy='{y(score):.1f}' r='3' fill='{'#c00' if drifted else '#36c'}'/>"
            for moment, score, drifted in points
        )
        parts.append(f"<h2>{html.escape(feature)} ({kinds[feature]})</h2>")
        parts.append(
            f"<svg width='{width}' height='{height}' role='img'>"
            f"<line x1='{pad}' x2='{width - pad}' y1='{y(threshold):.1f}' y2='{y(threshold):.1f}' stroke='#c00' "
            f"stroke-dasharray='4'/><text x='{width - pad}' y='{y(threshold) - 4:.1f}' text-anchor='end' "
            f"fill='#c00'>threshold {threshold:g}</text>"
            f"<polyline points='{line}' fill='none' stroke='#36c'/>{dots}"
            f"<text x='{pad}' y='{height - 8}'>{minute(first)}</text>"
            f"<text x='{width - pad}' y='{height - 8}' text-anchor='end'>{minute(last)}</text></svg>"
        )
    return "\n".join(parts) + "\n"


@drift_app.command("backfill")
def drift_backfill(
    name: Annotated[str, typer.Argument(help="Monitor name.")],
    since: Annotated[str, typer.Option("--since", help="From (ISO time or age such as 7d).")],
    until: Annotated[str | None, typer.Option("--until", help="To (default now).", show_default=False)] = None,
    step: Annotated[
        str | None, typer.Option("--step", help="One check per step (default: the monitor's window, else 1h).")
    ] = None,
    address: DriftOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the monitor over past windows, one check per step."""
    start = parse_time(since, "--since")
    end = parse_time(until, "--until") or datetime.now(UTC)
    assert start is not None
    with drift(address) as client:
        results = client.backfill(name, start.timestamp(), end.timestamp(), parse_duration(step, "--step"))
    if as_json:
        print_json([result_dict(result) for result in results])
        return
    for result in results:
        show_result(result)
    if not results:
        console.print("no window in that range held captured rows")


@drift_app.command("compare")
def drift_compare(
    reference: Annotated[Path, typer.Argument(help="The reference data (training data): CSV or Parquet.")],
    current: Annotated[Path, typer.Argument(help="The data to compare with it: CSV or Parquet.")],
    features: Annotated[
        list[str] | None,
        typer.Option("--features", help="Columns to compare (default: every reference column).", show_default=False),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Compare two files offline with the monitors' statistics; no service needed."""
    from services.common.convert import read_table_file
    from services.drift.domain import compare_tables, feature_dict

    try:
        result = compare_tables(read_table_file(reference), read_table_file(current), split_names(features))
    except MlmeshError as error:
        fail(error.message, 2)
    data = {
        "reference": str(reference),
        "current": str(current),
        "rows": result.n_rows,
        "drift_detected": result.drift_detected,
        "drift_coefficient": result.drift_coefficient,
        "drifted_features": list(result.drifted_features),
        "features": {name: feature_dict(name, found) for name, found in result.features.items()},
    }
    if as_json:
        print_json(data)
        return
    verdict = "[red]drift detected[/red]" if result.drift_detected else "no drift detected"
    console.print(f"{verdict}  {result.n_rows} rows  coefficient {result.drift_coefficient:.3f}")
    feature_table(data["features"])


# ---------------------------------------------------------------- captures

CollectorOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the collector. Default: MLMESH_COLLECTOR_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_COLLECTOR_PORT (50055).",
        show_default=False,
    ),
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="From this time (ISO 8601) or age (30m, 2d).", show_default=False)
]
LastOption = Annotated[
    str | None, typer.Option("--last", help="Or: the last period (1h, 7d), up to now.", show_default=False)
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Up to (not including) this time or age.", show_default=False)
]
CaptureDeploymentOption = Annotated[
    str, typer.Option("--deployment", help="Only this deployment's rows (default: every deployment).")
]
ColumnsOption = Annotated[
    list[str] | None,
    typer.Option("--columns", help="Columns to keep, comma-separated (default: all).", show_default=False),
]
LabelsOption = Annotated[bool, typer.Option("--labels", help="Add the ingested ground truth as a `label` column.")]
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i?)b?|b)?", re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def collector(address: str | None) -> contextlib.AbstractContextManager[CollectorClient]:
    return connected("collector", CollectorClient, address)


def capture_window(since: str | None, last: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """The (start, end) that --since/--last and --until name."""
    if since and last:
        raise typer.BadParameter("give --since or --last, not both", param_hint="--last")
    start = parse_time(since, "--since")
    if last:
        start = datetime.now(UTC) - timedelta(seconds=parse_duration(last, "--last"))
    return start, parse_time(until, "--until")


def parse_size(text: str, option: str) -> int:
    """`10GB` (powers of 1000), `512MiB` (of 1024), `1500` (bytes), or `none` (0: no limit)."""
    if text.strip().lower() in ("none", "0"):
        return 0
    found = _SIZE.fullmatch(text.strip())
    if not found:
        raise typer.BadParameter(f"{text!r} is not a size such as 500MB, 10GB, 2GiB or none", param_hint=option)
    unit, binary = (found[2] or "").lower(), bool(found[3])
    return int(float(found[1]) * ((1024 if binary else 1000) ** _SIZE_POWERS[unit] if unit else 1))


def human_duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def json_rows(table: Any) -> list[dict[str, Any]]:
    """Rows of an Arrow table as JSON-ready dicts (times in ISO 8601)."""
    return [
        {key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}
        for row in table.to_pylist()
    ]


def write_captures(reader: Any, path: Path, quiet: bool) -> int:
    """Stream a query's batches into a Parquet or CSV file (complete, or not there at all); its rows."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    nested = [field.name for field in reader.schema if pa.types.is_nested(field.type)]
    if path.suffix.lower() == ".csv" and nested:
        fail(f"CSV cannot hold the list column(s) {', '.join(nested)}: write a .parquet file or choose --columns")
    temporary = path.with_name(f".{path.name}.part")
    rows = 0
    try:
        with (
            progress_bar(TextColumn("{task.completed} rows"), TimeElapsedColumn(), quiet=quiet) as progress,
            pq.ParquetWriter(temporary, reader.schema)
            if path.suffix.lower() == ".parquet"
            else pa_csv.CSVWriter(temporary, reader.schema) as writer,
        ):
            task = progress.add_task(f"reading {path.name}", total=None)
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
                progress.update(task, completed=rows)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return rows


@captures_app.command("query")
def captures_query(
    endpoint: Annotated[str, typer.Argument(help="The endpoint whose captured requests to read.")],
    since: SinceOption = None,
    last: LastOption = None,
    until: UntilOption = None,
    deployment: CaptureDeploymentOption = "",
    columns: ColumnsOption = None,
    labels: LabelsOption = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write every row to this .parquet or .csv file.", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows shown in the table (without -o).")] = 20,
    address: CollectorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read an endpoint's captured rows (request_id, time, row, inputs, outputs).

    Prints a table of the first ones, every row with --json, or writes every row to a Parquet or CSV file.
    """
    if output is not None and output.suffix.lower() not in (".parquet", ".csv"):
        raise typer.BadParameter("the file name must end in .parquet or .csv", param_hint="--output")
    start, end = capture_window(since, last, until)
    with collector(address) as client:
        reader = client.query_reader(
            endpoint, start=start, end=end, deployment=deployment, columns=split_names(columns), include_labels=labels
        )
        if output is not None:
            rows = write_captures(reader, output, quiet=as_json)
            if as_json:
                print_json({"path": str(output), "rows": rows, "columns": reader.schema.names})
            else:
                console.print(f"wrote {rows} rows to {escape(str(output))}")
            return
        table = reader.read_all()
    if as_json:
        typer.echo(json.dumps(json_rows(table), indent=2))
        return
    shown = new_table(*(escape(name) for name in table.schema.names))
    for row in json_rows(table.slice(0, limit)):
        shown.add_row(*(escape("-" if value is None else str(value)) for value in row.values()))
    console.print(shown)
    more = f" (the first {limit} shown; -o FILE writes them all)" if table.num_rows > limit else ""
    console.print(f"{table.num_rows} rows{more}")


@captures_app.command("stats")
def captures_stats(
    endpoint: Annotated[str, typer.Argument(help="The endpoint.")],
    address: CollectorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rows, bytes, files and time span of an endpoint's captures, per deployment and model version."""
    with collector(address) as client:
        stats = client.stats(endpoint)
    if as_json:
        print_json(to_dict(stats))
        return
    total, retention = stats.total, stats.retention
    console.print(
        f"[bold]{escape(stats.endpoint)}[/bold]  {total.rows} rows  {human_size(total.bytes)} in {total.files} files  "
        f"{when(total.first_time)} .. {when(total.last_time)}  {stats.labels} labels"
    )
    table = new_table("deployment", "model version", "rows", "size", "files", "first", "last")
    for part in stats.partitions:
        table.add_row(
            escape(part.deployment),
            escape(part.model_version),
            str(part.rows),
            human_size(part.bytes),
            str(part.files),
            when(part.first_time),
            when(part.last_time),
        )
    console.print(table)
    console.print(f"retention: {retention_text(retention)}")


def retention_text(retention: Any) -> str:
    age = human_duration(retention.max_age_seconds) if retention.max_age_seconds else "no limit"
    size = human_size(retention.max_bytes) if retention.max_bytes else "no limit"
    return (
        f"max age {age}{' (default)' if retention.max_age_is_default else ''}, "
        f"max size {size}{' (default)' if retention.max_bytes_is_default else ''}"
    )


@captures_app.command("export")
def captures_export(
    endpoint: Annotated[str, typer.Argument(help="The endpoint whose captures to export.")],
    dataset: Annotated[str, typer.Argument(help="The dataset to register them as (its next version).")],
    since: SinceOption = None,
    last: LastOption = None,
    until: UntilOption = None,
    deployment: CaptureDeploymentOption = "",
    columns: ColumnsOption = None,
    labels: LabelsOption = False,
    description: Annotated[str, typer.Option("--description", help="The dataset version's description.")] = "",
    address: CollectorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a window of captures as the next version of a registry dataset.

    One Parquet file, so that live traffic can train the next model.
    """
    start, end = capture_window(since, last, until)
    with collector(address) as client, progress_bar(TimeElapsedColumn(), quiet=as_json) as progress:
        progress.add_task(f"exporting {endpoint}", total=None)
        exported = client.export(
            endpoint,
            dataset,
            start=start,
            end=end,
            deployment=deployment,
            columns=split_names(columns),
            include_labels=labels,
            description=description,
        )
    if as_json:
        print_json(to_dict(exported))
    else:
        console.print(
            f"registered dataset [bold]{escape(exported.dataset_ref)}[/bold] "
            f"({exported.rows} rows, {human_size(exported.bytes)})"
        )


def read_labels(path: Path) -> list[tuple[str, int, str | float]]:
    """(request_id, row, label) of a CSV file with columns request_id, label and optionally row;
    a label that reads as a number is sent as one."""
    try:
        with path.open(newline="") as source:
            rows = list(csv.DictReader(source))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        fail(f"cannot read {path}: {error}", 2)
    if not rows or not {"request_id", "label"} <= set(rows[0]):
        fail(f"{path} needs a header with request_id, label and optionally row", 2)
    labels: list[tuple[str, int, str | float]] = []
    for line, row in enumerate(rows, start=2):
        row_number = (row.get("row") or "0").strip()
        if not row_number.isdigit():
            fail(f"{path}, line {line}: row {row_number!r} is not a row number", 2)
        text = (row.get("label") or "").strip()
        try:
            value: str | float = float(text)
        except ValueError:
            value = text
        labels.append((row["request_id"] or "", int(row_number), value))
    return labels


@captures_app.command("labels")
def captures_labels(
    endpoint: Annotated[str, typer.Argument(help="The endpoint whose captured rows the labels are for.")],
    file: Annotated[Path, typer.Argument(help="CSV with columns request_id, row (optional, 0) and label.")],
    address: CollectorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record ground truth for captured rows from a CSV file.

    A row labelled again is replaced; queries and exports with --labels join them as a `label` column.
    """
    labels = read_labels(file)
    with (
        collector(address) as client,
        progress_bar(TextColumn("{task.completed}/{task.total} labels"), quiet=as_json) as progress,
    ):
        task = progress.add_task(f"labels for {endpoint}", total=len(labels))
        answer = client.ingest_labels(endpoint, labels, progress=lambda done: progress.update(task, completed=done))
    if as_json:
        print_json(to_dict(answer))
    else:
        console.print(f"stored {answer.ingested} labels for {escape(endpoint)} ({answer.replaced} replaced)")


@captures_app.command("retention")
def captures_retention(
    endpoint: Annotated[str, typer.Argument(help="The endpoint.")],
    max_age: Annotated[
        str | None,
        typer.Option("--max-age", help="Delete captures older than this (30d, 12h) or `none`.", show_default=False),
    ] = None,
    max_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-bytes", help="Delete the oldest while they take more (10GB, 500MiB) or `none`.", show_default=False
        ),
    ] = None,
    use_defaults: Annotated[
        bool, typer.Option("--default", help="Forget the endpoint's own limits: the collector's defaults apply.")
    ] = False,
    address: CollectorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set how long, and up to what size, an endpoint's captures are kept."""
    age = None
    if max_age is not None:
        age = 0.0 if max_age.strip().lower() == "none" else parse_duration(max_age, "--max-age")
    size = None if max_bytes is None else parse_size(max_bytes, "--max-bytes")
    with collector(address) as client:
        if age is None and size is None and not use_defaults:
            retention = client.get_retention(endpoint)
        else:
            retention = client.set_retention(endpoint, max_age_seconds=age, max_bytes=size, use_defaults=use_defaults)
    if as_json:
        print_json(to_dict(retention))
    else:
        console.print(f"{escape(endpoint)}: {retention_text(retention)}")


# ---------------------------------------------------------------- profiles


ProfilerOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the profiler. Default: MLMESH_PROFILER_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_PROFILER_PORT (50053).",
        show_default=False,
    ),
]
SIZE_KEYS = {"cpus": "cpus", "memory": "memory_mb", "memory_mb": "memory_mb", "threads": "threads"}
SIZE_KEYS |= {"batch": "max_batch_rows", "max_batch_rows": "max_batch_rows"}


def parse_size_option(text: str) -> dict[str, Any]:
    """`cpus=1,memory=512,threads=1,batch=16` -> the fields of a profiler Size."""
    size: dict[str, Any] = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        key, _, value = part.partition("=")
        field_name = SIZE_KEYS.get(key.strip())
        if field_name is None:
            fail(f"--size takes cpus=, memory=, threads= and batch=, not {key!r}", 2)
        try:
            size[field_name] = float(value) if field_name == "cpus" else int(value)
        except ValueError:
            fail(f"--size {key}= needs a number, not {value!r}", 2)
    if "cpus" not in size:
        fail(f"--size {text!r} needs cpus=", 2)
    return size


def profile_dict(profile: profiler_pb2.Profile) -> dict[str, Any]:
    """A profile as JSON: its fields, plus `steps` (every step of every size, with its size) and
    `recommendation` at the top."""
    value = to_dict(profile)
    value["status"] = profiler_pb2.ProfileStatus.Name(profile.status).removeprefix("PROFILE_STATUS_").lower()
    value["steps"] = [
        {**to_dict(step), "cpus": size.size.cpus, "memory_limit_mb": size.size.memory_mb}
        for size in profile.sizes
        for step in size.steps
    ]
    return value


def size_label(size: profiler_pb2.Size) -> str:
    label = f"{size.cpus:g} cpu"
    if size.memory_mb:
        label += f" {size.memory_mb} MiB"
    label += f" {size.threads}t"
    return label + (f" batch {size.max_batch_rows}" if size.max_batch_rows else "")


def show_profile(profile: profiler_pb2.Profile) -> None:
    status = profiler_pb2.ProfileStatus.Name(profile.status).removeprefix("PROFILE_STATUS_").lower()
    console.print(
        f"profile {profile.id} of {escape(profile.model_name)}:{profile.model_version} on {profile.target}: "
        f"{status} in {profile.seconds:.0f} s (samples: {escape(profile.samples)}, load: {profile.load_generator})"
    )
    if profile.reason:
        console.print(f"[red]{escape(profile.reason)}[/red]", soft_wrap=True)
    table = new_table(
        "size", "in flight", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "cpu %", "mem MiB", "load %"
    )
    for result in profile.sizes:
        for step in result.steps:
            load = f"{step.load_generator_cpu_percent:.0f}" + (
                " [yellow]saturated[/yellow]" if step.load_generator_saturated else ""
            )
            table.add_row(
                size_label(result.size),
                str(step.concurrency),
                f"{step.throughput_rps:,.0f}",
                f"{step.p50_ms:.2f}",
                f"{step.p90_ms:.2f}",
                f"{step.p99_ms:.2f}",
                f"{step.error_rate:.1%}" if step.errors else "0",
                f"{step.cpu_percent:.0f}",
                f"{step.memory_mb:.0f}",
                load,
            )
    console.print(table)
    recommendation = profile.recommendation
    if profile.status == profiler_pb2.PROFILE_STATUS_COMPLETED:
        colour = "green" if recommendation.met else "red"
        head = "recommended" if recommendation.met else "SLO not met"
        console.print(f"[{colour}]{head}:[/{colour}] {escape(recommendation.explanation)}", soft_wrap=True)


def write_profile_chart(path: Path, profile: profiler_pb2.Profile) -> None:
    """p99 latency against throughput, one line per size, with the SLO: PNG (matplotlib) or HTML (SVG)."""
    series = {
        size_label(result.size): [(step.throughput_rps, step.p99_ms) for step in result.steps]
        for result in profile.sizes
        if result.steps
    }
    slo = profile.slo.p99_ms
    suffix = path.suffix.lower()
    if suffix == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            fail("a PNG chart needs matplotlib (pip install 'mlmesh[charts]'); or write --chart FILE.html", 2)
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for label, points in series.items():
            axis.plot([rate for rate, _ in points], [p99 for _, p99 in points], marker="o", label=label)
        axis.axhline(slo, color="red", linestyle="--", label=f"SLO p99 {slo:g} ms")
        axis.set_xlabel("throughput (requests/s)")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_title(f"{profile.model_name}:{profile.model_version} on {profile.target}")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        return
    if suffix != ".html":
        fail("--chart takes a .png or .html file", 2)
    width, height, pad = 640, 360, 40
    top_rate = max([rate for points in series.values() for rate, _ in points] or [1.0]) or 1.0
    top_latency = max([slo * 1.2, *(p99 for points in series.values() for _, p99 in points)])
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]

    def x(rate: float) -> float:
        return pad + rate / top_rate * (width - 2 * pad)

    def y(latency: float) -> float:
        return height - pad - latency / top_latency * (height - 2 * pad)

    parts = [
        "<!doctype html><meta charset=utf-8>",
        f"<title>profile {html.escape(profile.id)}</title>",
        "<style>body{font:13px sans-serif;margin:20px}</style>",
        f"<h1 style='font-size:16px'>p99 latency against throughput: {html.escape(profile.model_name)}:"
        f"{profile.model_version} on {html.escape(profile.target)}</h1>",
        f"<svg width={width} height={height} style='border:1px solid #ccc'>",
        f"<line x1={pad} y1={y(slo):.1f} x2={width - pad} y2={y(slo):.1f} stroke=red stroke-dasharray='4 3'/>",
        f"<text x={width - pad} y={y(slo) - 4:.1f} text-anchor=end fill=red>SLO {slo:g} ms</text>",
        f"<text x={width / 2} y={height - 8} text-anchor=middle>requests/s (max {top_rate:,.0f})</text>",
        f"<text x=8 y={pad - 12}>p99 ms (max {top_latency:.1f})</text>",
    ]
    for index, (label, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        line = " ".join(f"{x(rate):.1f},{y(p99):.1f}" for rate, p99 in points)
        parts.append(f"<polyline points='{line}' fill=none stroke='{colour}' stroke-width=2/>")
        parts.extend(f"<circle cx={x(rate):.1f} cy={y(p99):.1f} r=3 fill='{colour}'/>" for rate, p99 in points)
        parts.append(
            f"<text x={width - pad + 4 - 150} y={pad + 14 * index} fill='{colour}'>{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts))


@app.command("profile")
def profile_command(
    ref: Annotated[str, typer.Argument(help="An ONNX model version: name:version or name@alias.")],
    slo_p99_ms: Annotated[
        float, typer.Option("--slo-p99-ms", help="The latency goal: p99 in milliseconds.", min=0.0)
    ] = 100.0,
    slo_rps: Annotated[
        float, typer.Option("--slo-rps", help="A throughput goal in requests/s (sets the replicas); 0: none.", min=0.0)
    ] = 0.0,
    target: Annotated[str, typer.Option("--target", help="local (processes pinned to cores) or docker.")] = "local",
    image: Annotated[
        str, typer.Option("--image", help="docker: an image serving the model; default: the builder's.")
    ] = "",
    sample_dataset: Annotated[
        str,
        typer.Option(
            "--sample-dataset",
            help="Sample inputs from a registered dataset (name:version). Default: the version's input example, "
            "else rows generated from the signature.",
        ),
    ] = "",
    rows: Annotated[int, typer.Option("--rows", min=0, help="Rows per request (0: 1).")] = 0,
    concurrency: Annotated[
        str | None,
        typer.Option(
            "--concurrency",
            help="Calls in flight at each step, comma-separated (default 1,2,4,8,16).",
            show_default=False,
        ),
    ] = None,
    sizes: Annotated[
        list[str] | None,
        typer.Option(
            "--size",
            help="A size to try, as cpus=N[,memory=MiB][,threads=N][,batch=ROWS]; repeat for more. Default: local 1 "
            "core, 1 core with batching and every core; docker 0.5, 1 and 2 cpus with 1024 MiB.",
            show_default=False,
        ),
    ] = None,
    step_seconds: Annotated[
        float, typer.Option("--step-seconds", min=0.0, help="Measured length of each step (0: 1.5).")
    ] = 0.0,
    warmup_seconds: Annotated[
        float, typer.Option("--warmup-seconds", min=0.0, help="Warm-up before each step (0: 0.5).")
    ] = 0.0,
    chart: Annotated[
        Path | None,
        typer.Option("--chart", help="Write p99 latency against throughput per size: FILE.png or FILE.html."),
    ] = None,
    address: ProfilerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Profile a model version: run the real runtime at each size, load it at each concurrency,
    measure throughput, latency, CPU and memory, and recommend the smallest size (and replicas)
    that meets the SLO with 20% headroom. `mlmesh deploy create ... --resources recommended` uses it."""
    try:
        levels = [int(level) for level in (concurrency or "").split(",") if level.strip()]
    except ValueError:
        fail(f"--concurrency takes whole numbers separated by commas, not {concurrency!r}", 2)
    if concurrency is not None and not levels:
        fail("--concurrency names no level: give calls in flight such as 1,4,16 (or leave it out for the default)", 2)
    size_fields = [parse_size_option(text) for text in sizes or []]
    with (
        profiler(address) as client,
        progress_bar(TextColumn("{task.completed}/{task.total} steps"), quiet=as_json) as bar,
    ):
        task = bar.add_task(f"profiling {ref}", total=None)

        def advance(update: profiler_pb2.ProfileProgress) -> None:
            bar.update(task, description=escape(update.message[:80]), completed=update.done, total=update.total or None)

        profile = client.profile(
            ref,
            slo_p99_ms=slo_p99_ms,
            slo_throughput_rps=slo_rps,
            target=target,
            image=image,
            sample_dataset=sample_dataset,
            rows_per_request=rows,
            concurrency=levels,
            sizes=size_fields,
            step_seconds=step_seconds,
            warmup_seconds=warmup_seconds,
            on_progress=advance,
        )
    if chart is not None:
        write_profile_chart(chart, profile)
    if as_json:
        print_json(profile_dict(profile))
    else:
        show_profile(profile)
        if chart is not None:
            console.print(f"chart: {escape(str(chart))}")
    if profile.status == profiler_pb2.PROFILE_STATUS_FAILED:
        raise typer.Exit(1)


@profiles_app.command("list")
def profiles_list(
    model: Annotated[str, typer.Argument(help="Only this model's profiles (name or name:version).")] = "",
    limit: Annotated[int, typer.Option(min=0, help="At most this many, newest first (0: all).")] = 50,
    address: ProfilerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List profiles, newest first, with each one's recommendation."""
    name, _, version_text = model.partition(":")
    if version_text and not version_text.isdigit():
        fail("give a model as name or name:version", 2)
    with profiler(address) as client:
        profiles = client.list(name, int(version_text or 0), limit=limit)
    if as_json:
        print_json([profile_dict(profile) for profile in profiles])
        return
    table = new_table("id", "model", "target", "status", "SLO p99", "recommendation", "created")
    for found in profiles:
        status = profiler_pb2.ProfileStatus.Name(found.status).removeprefix("PROFILE_STATUS_").lower()
        recommendation = found.recommendation
        summary = (
            f"{recommendation.replicas} x {recommendation.cpus:g} cpu, {recommendation.memory_mb} MiB"
            if recommendation.met
            else (found.reason or "SLO not met")[:60]
        )
        table.add_row(
            found.id,
            f"{escape(found.model_name)}:{found.model_version}",
            found.target,
            status,
            f"{found.slo.p99_ms:g} ms",
            escape(summary),
            when(found.created_at),
        )
    console.print(table)


@profiles_app.command("show")
def profiles_show(
    profile_id: Annotated[str, typer.Argument(help="A profile id (or profiles/<id>).")],
    chart: Annotated[
        Path | None,
        typer.Option("--chart", help="Write p99 latency against throughput per size: FILE.png or FILE.html."),
    ] = None,
    address: ProfilerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one profile: every step's figures and the recommendation."""
    with profiler(address) as client:
        found = client.get(profile_id)
    if chart is not None:
        write_profile_chart(chart, found)
    if as_json:
        print_json(profile_dict(found))
    else:
        show_profile(found)


# ---------------------------------------------------------------- webhooks


NotifierOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the notifier. Default: MLMESH_NOTIFIER_ADDRESS, else the mesh that `mlmesh up` "
        "started in MLMESH_HOME, else 127.0.0.1:MLMESH_NOTIFIER_PORT (50057).",
        show_default=False,
    ),
]
DELIVERY_STATUSES = {
    "pending": notifier_pb2.DELIVERY_STATUS_PENDING,
    "delivered": notifier_pb2.DELIVERY_STATUS_DELIVERED,
    "failed": notifier_pb2.DELIVERY_STATUS_FAILED,
}


def webhook_dict(webhook: notifier_pb2.Webhook) -> dict[str, Any]:
    return to_dict(webhook)


def delivery_dict(delivery: notifier_pb2.Delivery) -> dict[str, Any]:
    value = to_dict(delivery)
    value["status"] = notifier_pb2.DeliveryStatus.Name(delivery.status).removeprefix("DELIVERY_STATUS_").lower()
    return value


def show_webhook(webhook: notifier_pb2.Webhook) -> None:
    state = "[green]enabled[/green]" if webhook.enabled else f"[red]disabled[/red]: {escape(webhook.disabled_reason)}"
    console.print(f"[bold]{webhook.id}[/bold]  {escape(webhook.url)}  {state}")
    console.print(f"  events: {escape(', '.join(webhook.events))}")
    if webhook.description:
        console.print(f"  {escape(webhook.description)}")


def split_patterns(text: str) -> list[str]:
    return [pattern.strip() for pattern in text.split(",") if pattern.strip()]


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST events (http:// or https://).")],
    events: Annotated[
        str,
        typer.Option("--events", help="Event kinds to send, comma-separated patterns: model.*,deployment.ready or *."),
    ],
    description: Annotated[str, typer.Option("--description", help="What the endpoint is for.")] = "",
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a webhook endpoint; prints its id and its signing secret (whsec_...), shown this once."""
    with notifier(address) as client:
        created = client.create(url, split_patterns(events), description)
    if as_json:
        print_json({"id": created.webhook.id, "secret": created.secret, "webhook": webhook_dict(created.webhook)})
        return
    show_webhook(created.webhook)
    console.print(f"secret: [bold]{created.secret}[/bold]  (shown once: verify signatures with it)")


@webhooks_app.command("list")
def webhooks_list(address: NotifierOption = None, as_json: JsonOption = False) -> None:
    """List webhook endpoints."""
    with notifier(address) as client:
        found = client.list()
    if as_json:
        print_json([webhook_dict(webhook) for webhook in found])
        return
    table = new_table("id", "url", "events", "state", "created")
    for webhook in found:
        state = "enabled" if webhook.enabled else f"disabled: {webhook.disabled_reason}"
        table.add_row(
            webhook.id, escape(webhook.url), escape(", ".join(webhook.events)), escape(state), when(webhook.created_at)
        )
    console.print(table)


@webhooks_app.command("show")
def webhooks_show(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one webhook endpoint."""
    with notifier(address) as client:
        webhook = client.get(webhook_id)
    if as_json:
        print_json(webhook_dict(webhook))
    else:
        show_webhook(webhook)


@webhooks_app.command("update")
def webhooks_update(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    url: Annotated[str | None, typer.Option("--url", help="A new URL.", show_default=False)] = None,
    events: Annotated[
        str | None, typer.Option("--events", help="New patterns, comma-separated.", show_default=False)
    ] = None,
    description: Annotated[str | None, typer.Option("--description", show_default=False)] = None,
    enable: Annotated[
        bool | None,
        typer.Option("--enable/--disable", help="Enable (after a 410 or failures) or disable.", show_default=False),
    ] = None,
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change an endpoint's URL, patterns or description, or enable or disable it."""
    with notifier(address) as client:
        webhook = client.update(
            webhook_id,
            url=url,
            events=split_patterns(events) if events is not None else None,
            description=description,
            enabled=enable,
        )
    if as_json:
        print_json(webhook_dict(webhook))
    else:
        show_webhook(webhook)


@webhooks_app.command("rm")
def webhooks_rm(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete an endpoint with its deliveries."""
    with notifier(address) as client:
        client.delete(webhook_id)
    if as_json:
        print_json({"deleted": webhook_id})
    else:
        console.print(f"deleted {webhook_id}")


@webhooks_app.command("rotate")
def webhooks_rotate(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """A new signing secret (shown once); the old one keeps signing beside it for a while."""
    with notifier(address) as client:
        rotated = client.rotate(webhook_id)
    if as_json:
        print_json({"id": webhook_id, "secret": rotated.secret, "webhook": webhook_dict(rotated.webhook)})
        return
    console.print(f"secret: [bold]{rotated.secret}[/bold]  (shown once)")
    console.print(f"the old secret signs too until {when(rotated.webhook.previous_secret_expires_at)}")


def attempts_text(delivery: notifier_pb2.Delivery) -> str:
    return "; ".join(
        f"{when(attempt.attempted_at)} "
        + (f"HTTP {attempt.status_code}" if attempt.status_code else escape(attempt.error[:80]))
        + f" {attempt.latency_ms:.0f} ms"
        for attempt in delivery.attempt_log[-3:]
    )


@webhooks_app.command("test")
def webhooks_test(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a webhook.test event to the endpoint now and show how it answered."""
    with notifier(address) as client:
        delivery = client.test(webhook_id)
    if as_json:
        print_json(delivery_dict(delivery))
    else:
        console.print(f"{delivery_dict(delivery)['status']}: {attempts_text(delivery)}")
    if delivery.status != notifier_pb2.DELIVERY_STATUS_DELIVERED:
        raise typer.Exit(1)


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    event: Annotated[str, typer.Option("--event", help="Only this event's deliveries.")] = "",
    status: Annotated[str, typer.Option("--status", help="pending, delivered or failed.")] = "",
    limit: Annotated[int, typer.Option(min=0, help="At most this many, newest first (0: all).")] = 50,
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """List an endpoint's deliveries, newest first, with their attempts."""
    if status and status not in DELIVERY_STATUSES:
        fail(f"--status takes pending, delivered or failed, not {status!r}", 2)
    with notifier(address) as client:
        found = client.deliveries(webhook_id, event_id=event, status=DELIVERY_STATUSES.get(status, 0), limit=limit)
    if as_json:
        print_json([delivery_dict(delivery) for delivery in found])
        return
    table = new_table("event", "kind", "origin", "status", "attempts", "last attempts")
    for delivery in found:
        table.add_row(
            delivery.event_id,
            delivery.event_kind,
            delivery.origin,
            delivery_dict(delivery)["status"],
            str(delivery.attempts),
            attempts_text(delivery),
        )
    console.print(table)


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    event_id: Annotated[str, typer.Argument(help="The event to deliver again (same webhook-id).")],
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deliver one kept event to the endpoint again."""
    with notifier(address) as client:
        delivery = client.redeliver(webhook_id, event_id)
    if as_json:
        print_json(delivery_dict(delivery))
    else:
        console.print(f"queued delivery {delivery.id} of {event_id}")


@webhooks_app.command("replay")
def webhooks_replay(
    webhook_id: Annotated[str, typer.Argument(help="Webhook id.")],
    since: Annotated[str, typer.Option("--since", help="From this time (ISO 8601, or 2h for two hours ago).")],
    until: Annotated[str | None, typer.Option("--until", help="Until this time (default: now).")] = None,
    address: NotifierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deliver again every kept event of a time range that the endpoint's patterns match."""
    start = parse_time(since, "--since")
    end = parse_time(until, "--until") or datetime.now(UTC)
    assert start is not None
    with notifier(address) as client:
        queued = client.replay(webhook_id, start, end)
    if as_json:
        print_json({"queued": queued})
    else:
        console.print(f"queued {queued} event(s) again")


# ---------------------------------------------------------------- retraining


AutomationOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="host:port of the automation service. Default: MLMESH_AUTOMATION_ADDRESS, else the mesh that "
        "`mlmesh up` started in MLMESH_HOME, else 127.0.0.1:MLMESH_AUTOMATION_PORT (50058).",
        show_default=False,
    ),
]
RUN_STATUSES = {
    automation_pb2.RUN_STATUS_RUNNING: "running",
    automation_pb2.RUN_STATUS_COMPLETED: "completed",
    automation_pb2.RUN_STATUS_FAILED: "failed",
}


def run_dict(run: automation_pb2.RetrainRun) -> dict[str, Any]:
    value = to_dict(run)
    value["status"] = RUN_STATUSES.get(run.status, "unknown")
    return value


def show_run(run: automation_pb2.RetrainRun) -> None:
    status = RUN_STATUSES.get(run.status, "unknown")
    colour = {"completed": "green", "failed": "red"}.get(status, "yellow")
    console.print(f"run {run.id} of policy {escape(run.policy)} ({escape(run.trigger)}): [{colour}]{status}[/{colour}]")
    if run.produced_version:
        console.print(
            f"  produced {escape(run.model)}:{run.produced_version}; champion was {run.champion_version or '-'}"
        )
    if run.metric:
        console.print(f"  {run.metric}: challenger {run.challenger_score:.4f}, champion {run.champion_score:.4f}")
    if run.message:
        console.print(f"  {'promoted' if run.promoted else 'decision'}: {escape(run.message)}", soft_wrap=True)
    if run.rollout != "none" and run.rollout:
        figures = ", ".join(f"{key} {value:g}" for key, value in sorted(run.rollout_figures.items()))
        console.print(f"  rollout: {run.rollout.replace('_', ' ')} ({figures})")


@policy_app.command("create")
def retrain_policy_create(
    name: Annotated[str, typer.Argument(help="Policy name: lowercase letters, digits and '-'.")],
    model: Annotated[str, typer.Option("--model", help="The registered model it retrains (its champion alias moves).")],
    command: Annotated[
        str,
        typer.Option(
            "--command",
            help="The training command, split like a shell would (no shell runs it). It reads "
            "$MLMESH_TRAINING_DATA and writes model.onnx (and metrics.json) into $MLMESH_OUTPUT_DIR.",
        ),
    ],
    holdout: Annotated[
        str, typer.Option("--holdout", help="Holdout dataset (name or name:version) both models are scored on.")
    ],
    label: Annotated[str, typer.Option("--label", help="The holdout column with the true answers.")],
    metric: Annotated[
        str, typer.Option("--metric", help="accuracy, f1, auc (higher wins) or rmse (lower wins).")
    ] = "accuracy",
    min_delta: Annotated[float, typer.Option("--min-delta", help="How much better the challenger must be.")] = 0.0,
    training_dataset: Annotated[
        str,
        typer.Option(
            "--training-dataset", help="Training data (name: its newest version at each run, or name:version)."
        ),
    ] = "",
    working_dir: Annotated[str, typer.Option("--working-dir", help="Where the command runs (default: here).")] = "",
    environment: Annotated[
        str,
        typer.Option(
            "--environment",
            help="Train in this registered environment (name: its newest version at each run, or name:version; "
            "`mlmesh env list`): a virtual environment with exactly its lock, made once, first on PATH, so "
            "the command's `python` is its own. Default: the automation service's own environment.",
        ),
    ] = "",
    timeout: Annotated[str, typer.Option("--timeout", help="Longest a training may take (30m, 2h).")] = "1h",
    trigger: Annotated[str, typer.Option("--trigger", help="manual, drift, dataset or schedule.")] = "manual",
    monitor: Annotated[
        str, typer.Option("--monitor", help="drift: the monitor whose drift.detected starts a run.")
    ] = "",
    on_dataset: Annotated[
        str, typer.Option("--on-dataset", help="dataset: a new version of this dataset starts a run.")
    ] = "",
    every: Annotated[str, typer.Option("--every", help="schedule: how often (1d, 12h).")] = "",
    rollout_endpoint: Annotated[
        str,
        typer.Option(
            "--rollout-endpoint",
            help="Roll a winner out on this endpoint (shadow, canary, all traffic) before it becomes champion; "
            "errors or slower answers roll it back.",
        ),
    ] = "",
    shadow: Annotated[
        str, typer.Option("--shadow", help="Mirrored copies for this long first (5m); default none.")
    ] = "",
    canary_percent: Annotated[int, typer.Option("--canary-percent", min=0, max=99, help="Canary share (0: 10).")] = 0,
    canary: Annotated[str, typer.Option("--canary", help="Canary length (default 1m).")] = "",
    max_error_rate: Annotated[
        float, typer.Option("--max-error-rate", min=0.0, max=1.0, help="Most errors per request (0: 0.01).")
    ] = 0.0,
    max_latency_ratio: Annotated[
        float,
        typer.Option("--max-latency-ratio", min=0.0, help="Most p99 as a multiple of the serving one's (0: 1.5)."),
    ] = 0.0,
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a retrain policy."""
    import shlex

    try:
        argv = shlex.split(command)
    except ValueError as error:
        fail(f"--command cannot be split: {error}", 2)
    directory = str(Path(working_dir).resolve()) if working_dir else str(Path.cwd())
    with automation(address) as client:
        created = client.create_policy(
            name,
            model,
            command=argv,
            holdout_dataset=holdout,
            label_column=label,
            metric=metric,
            min_delta=min_delta,
            training_dataset=training_dataset,
            working_dir=directory,
            environment=environment,
            timeout_seconds=parse_duration(timeout, "--timeout"),
            trigger=trigger,
            monitor=monitor,
            dataset=on_dataset,
            schedule_seconds=parse_duration(every, "--every") if every else 0,
            rollout={
                "endpoint": rollout_endpoint,
                "shadow_seconds": parse_duration(shadow, "--shadow"),
                "canary_percent": canary_percent,
                "canary_seconds": parse_duration(canary, "--canary"),
                "max_error_rate": max_error_rate,
                "max_latency_ratio": max_latency_ratio,
            },
        )
    if as_json:
        print_json(to_dict(created))
    else:
        console.print(
            f"policy [bold]{escape(created.name)}[/bold] retrains {escape(created.model)} ({created.trigger.kind})"
        )


@policy_app.command("list")
def retrain_policy_list(address: AutomationOption = None, as_json: JsonOption = False) -> None:
    """List retrain policies."""
    with automation(address) as client:
        found = client.list_policies()
    if as_json:
        print_json([to_dict(policy) for policy in found])
        return
    table = new_table("policy", "model", "trigger", "metric", "last run")
    for policy in found:
        table.add_row(
            escape(policy.name),
            escape(policy.model),
            policy.trigger.kind,
            f"{policy.evaluation.metric} +{policy.evaluation.min_delta:g}",
            when(policy.last_run_at) if policy.HasField("last_run_at") else "-",
        )
    console.print(table)


@policy_app.command("show")
def retrain_policy_show(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a retrain policy."""
    with automation(address) as client:
        found = client.get_policy(name)
    if as_json:
        print_json(to_dict(found))
    else:
        console.print(escape(json.dumps(to_dict(found), indent=2)))


@policy_app.command("delete")
def retrain_policy_delete(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a retrain policy (its runs stay)."""
    with automation(address) as client:
        client.delete_policy(name)
    if as_json:
        print_json({"deleted": name})
    else:
        console.print(f"deleted policy {escape(name)}")


@retrain_app.command("run")
def retrain_run(
    policy: Annotated[str, typer.Argument(help="Policy name.")],
    wait: Annotated[bool, typer.Option(help="Wait until the run finishes.")] = True,
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a run of a policy now; with --wait (the default) show how it ended."""
    with automation(address) as client:
        run = client.start_run(policy)
        if wait:
            with contextlib.ExitStack() as stack:
                if not as_json:
                    stack.enter_context(error_console.status(f"retraining with policy {policy}"))
                run = client.wait_run(run.id)
    if as_json:
        print_json(run_dict(run))
    else:
        show_run(run)
    if run.status == automation_pb2.RUN_STATUS_FAILED:
        raise typer.Exit(1)


@retrain_app.command("runs")
def retrain_runs(
    policy: Annotated[str, typer.Argument(help="Only this policy's runs.")] = "",
    limit: Annotated[int, typer.Option(min=0, help="At most this many, newest first (0: all).")] = 50,
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """List retrain runs, newest first."""
    with automation(address) as client:
        found = client.list_runs(policy, limit)
    if as_json:
        print_json([run_dict(run) for run in found])
        return
    table = new_table("run", "policy", "trigger", "status", "version", "promoted", "started")
    for run in found:
        table.add_row(
            run.id,
            escape(run.policy),
            escape(run.trigger),
            RUN_STATUSES.get(run.status, "?"),
            str(run.produced_version or "-"),
            "yes" if run.promoted else "no",
            when(run.started_at),
        )
    console.print(table)


@retrain_app.command("show")
def retrain_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    address: AutomationOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: what it produced, the scores, the decision and the training's last lines."""
    with automation(address) as client:
        run = client.get_run(run_id)
    if as_json:
        print_json(run_dict(run))
        return
    show_run(run)
    for line in run.log_tail[-20:]:
        console.print(f"  | {escape(line)}", style="dim")


# ---------------------------------------------------------------- the demo


@app.command()
def demo(as_json: JsonOption = False) -> None:
    """Walk the whole loop on this machine: train, register, convert, profile, deploy, capture,
    drift, retrain, compare, promote through a canary, with every event at a local webhook
    receiver that verifies its signature. The mesh (started when none runs) stays up afterwards."""
    from services import demo as walk

    home = MeshSettings().home.resolve()
    quiet = as_json

    def say(line: str) -> None:
        if not quiet:
            console.print(escape(line), soft_wrap=True)

    @contextmanager
    def step(title: str) -> Iterator[None]:
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            if not quiet:
                stack.enter_context(error_console.status(title))
            yield
        say(f"[{time.monotonic() - started:5.1f}s] {title}")

    try:
        summary = walk.run(home, say, step)
    except (MeshError, MlmeshError, RuntimeError, launcher.LaunchError) as error:
        fail(f"the demo stopped: {error}; the mesh's logs are in {home / 'logs'}")
    if as_json:
        print_json(summary)
        return
    console.print()
    promoted = f"{walk.MODEL}:{summary['promoted_version']}"
    console.print(f"[bold green]done in {summary['seconds']:.0f} s[/bold green]: {promoted} was promoted")
    console.print(f"events at the webhook receiver (every signature verified): {summary['events']}")
    console.print(
        "the mesh is still running: try `mlmesh status`, `mlmesh models show demo-cancer@champion`, "
        "`mlmesh deploy show demo-cancer`, `mlmesh retrain runs`; stop it with `mlmesh down`"
    )


if __name__ == "__main__":
    app()
