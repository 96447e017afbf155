"""The collector's store in this process, on a real SQLite file and real Parquet files: capture
messages (encoded by the runtime's own encoder) become columns by the documented rules, flushes
are recorded with their stream sequences, a restart cleans up what no commit recorded, and
retention deletes the oldest files first."""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from services.collector.domain import Collector, LabelInput, SequenceRanges, Window, _FolderLock
from services.collector.models import TABLES
from services.collector.records import CaptureBuffer, MalformedCapture, parse_subject
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument
from tests.collector.processes import message_of, payloads, records_of, request


def open_collector(folder: Path, database: str = "collector.db", **options: float) -> Collector:
    """A collector on `folder`; `database` is a file name in it (SQLite) or a database URL."""
    database_handle = Database(database if "://" in database else f"sqlite:///{folder / database}", TABLES)
    database_handle.create_tables()
    collector = Collector(database_handle, folder / "captures", **options)  # type: ignore[arg-type]
    collector.open_store()
    return collector


def buffered(endpoint: str, requests: list[dict], first_sequence: int = 1, max_bytes: int = 1 << 20) -> CaptureBuffer:
    buffer = CaptureBuffer()
    for sequence, payload in enumerate(payloads(requests, max_bytes), start=first_sequence):
        buffer.add(endpoint, "blue", sequence, payload)
    return buffer


def table_of(collector: Collector, window: Window) -> pa.Table:
    query = collector.query(window)
    return pa.Table.from_batches(list(query.batches), schema=query.schema)


def test_tensors_become_columns_by_shape_and_datatypes_keep_their_width(tmp_path: Path) -> None:
    random = np.random.default_rng(3)
    x = random.random((4, 3), dtype=np.float32)
    image = random.random((4, 2, 2)).astype(np.float64)
    wide = random.integers(0, 9, (4, 2000)).astype(np.int64)
    half = np.array([0.5, 1.5, -2, 8], np.float16)
    flags = np.array([True, False, True, True])
    words = np.array(["a", "bé", "c", ""], dtype=object)
    label = np.array([1, 0, 1, 1], np.int64)
    captured = request(
        "req-1",
        {"x": x, "image": image, "wide": wide, "half": half, "flags": flags, "words": words},
        {"label": label, "y": x + 1},
    )
    collector = open_collector(tmp_path)
    collector.flush(buffered("shop", [captured]), "epoch")

    table = pads.dataset(tmp_path / "captures", partitioning="hive").to_table()
    assert table.column_names[:3] == ["request_id", "time", "row"]
    assert [name for name in table.column_names if name.startswith("x.")] == ["x.0", "x.1", "x.2"]
    assert table.schema.field("x.0").type == pa.float32()
    assert table.column("row").to_pylist() == [0, 1, 2, 3]
    assert table.column("request_id").to_pylist() == ["req-1"] * 4
    for column in range(3):
        assert table.column(f"x.{column}").to_pylist() == x[:, column].tolist()
        assert table.column(f"y.{column}").to_pylist() == (x + 1)[:, column].tolist()
    assert table.schema.field("image").type == pa.list_(pa.float64())
    assert table.column("image").to_pylist() == [row.reshape(-1).tolist() for row in image]
    assert table.column("wide").to_pylist() == wide.tolist()  # more than 1,024 features: one list column
    assert table.schema.field("half").type == pa.float32()  # FP16 widened
    assert table.column("half").to_pylist() == half.astype(np.float32).tolist()
    assert table.column("flags").to_pylist() == flags.tolist()
    assert table.column("words").to_pylist() == words.tolist()
    # A tensor called `label` would hide the joined ground truth: it is stored as output.label.
    assert table.column("output.label").to_pylist() == label.tolist()
    assert table.column("endpoint").to_pylist() == ["shop"] * 4  # the partition folders
    assert table.column("deployment").to_pylist() == ["blue"] * 4
    assert abs(table.column("time")[0].as_py().timestamp() - captured.time) < 1e-5


def test_inputs_and_outputs_sharing_a_name_do_not_collide(tmp_path: Path) -> None:
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    taken = np.array([7.0, 8.0], np.float32)
    captured = request("r", {"x": x, "time": taken, "x.0": taken}, {"x": x * 10, "x.1": taken})
    collector = open_collector(tmp_path)
    collector.flush(buffered("names", [captured]), "epoch")
    table = table_of(collector, Window("names"))
    assert table.column_names == [
        *("request_id", "time", "row", "deployment", "model_version"),
        *("x.0", "x.1", "input.time", "input.x.0", "output.x.0", "output.x.1", "output.output.x.1"),
    ]
    assert table.column("x.1").to_pylist() == [1.0, 3.0]
    assert table.column("output.x.1").to_pylist() == [10.0, 30.0]
    assert table.column("input.time").to_pylist() == [7.0, 8.0]
    assert table.column("output.output.x.1").to_pylist() == [7.0, 8.0]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_requests_stacked_in_one_record_keep_their_ids_rows_and_hours(tmp_path: Path, database_url: str) -> None:
    hour = 3600 * (int(time.time()) // 3600)
    # Alike requests of 2 rows stack into one record, which straddles an hour boundary.
    names = ("a", "b", "c")
    moments = {"a": hour - 1.5, "b": hour + 0.25, "c": hour - 0.5}
    x = {name: np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * index for index, name in enumerate(names)}
    stacked = [request(name, {"x": x[name]}, {}, moment=moments[name]) for name in names]
    # Images of other shapes are other records of the same list-column layout.
    images = [request(f"i{side}", {"image": np.full((1, side, side), side, np.float64)}, {}) for side in (2, 3)]
    (message,) = payloads(stacked + images)
    records = records_of(message)
    assert [(record["ids"], record["counts"]) for record, _ in records] == [
        (list(names), [2, 2, 2]),
        (["i2"], [1]),
        (["i3"], [1]),
    ]
    # The format lets a record's requests differ in rows: the same six rows as 1, 2 and 3 of d, e, f.
    uneven = ({**records[0][0], "ids": ["d", "e", "f"], "counts": [1, 2, 3]}, records[0][1])
    buffer = CaptureBuffer()
    assert buffer.add("stack", "blue", 1, message).rows == 8
    assert buffer.add("stack", "blue", 2, message_of([uneven])).rows == 6
    collector = open_collector(tmp_path, database_url)
    collector.flush(buffer, "epoch")

    table = table_of(collector, Window("stack", columns=("request_id", "time", "row", "x.0", "x.1")))
    table = table.filter(pc.is_valid(table.column("x.0")))
    got = sorted(zip(*(table.column(name).to_pylist() for name in ("request_id", "row", "x.0", "x.1")), strict=True))
    rows = np.concatenate([x[name] for name in names])
    owners = [
        ("a", 0),
        ("a", 1),
        ("b", 0),
        ("b", 1),
        ("c", 0),
        ("c", 1),
        ("d", 0),
        ("e", 0),
        ("e", 1),
        ("f", 0),
        ("f", 1),
        ("f", 2),
    ]
    assert got == sorted((name, row, *rows[index % 6].tolist()) for index, (name, row) in enumerate(owners))
    folders = {path.parent.name for path in (tmp_path / "captures").rglob("*.parquet")}
    assert {f"hour={(hour - 3600) // 3600 % 24:02d}", f"hour={hour // 3600 % 24:02d}"} <= folders
    before = table.filter(pc.less(table.column("time"), pa.scalar(hour * 10**6, pa.timestamp("us", "UTC"))))
    assert sorted(set(before.column("request_id").to_pylist())) == ["a", "c", "d", "f"]
    # Ground truth joins by request and row, and a label given again replaces the first.
    assert collector.ingest_labels("stack", [LabelInput("e", 1, number=1), LabelInput("f", 2, number=0)]) == (2, 0)
    assert collector.ingest_labels("stack", [LabelInput("e", 1, number=5)]) == (1, 1)
    labelled = table_of(collector, Window("stack", columns=("request_id", "row"), include_labels=True)).to_pylist()
    assert sorted((r["request_id"], r["row"], r["label"]) for r in labelled if r["label"] is not None) == [
        ("e", 1, 5.0),
        ("f", 2, 0.0),
    ]
    images_table = table_of(collector, Window("stack", columns=("request_id", "image")))
    pictures = {r["request_id"]: r["image"] for r in images_table.to_pylist() if r["image"] is not None}
    assert pictures == {"i2": [2.0] * 4, "i3": [3.0] * 9}


def test_a_request_split_over_messages_keeps_its_row_numbers(tmp_path: Path) -> None:
    x = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    # 1,000 rows of 3 floats take 16 KB of base64: the runtime's encoder splits them at 4 KB.
    pieces = payloads([request("big", {"x": x}, {"y": x[:, :1]})], max_bytes=4096)
    assert len(pieces) > 3
    buffer = CaptureBuffer()
    for sequence, payload in enumerate(pieces, start=1):
        assert buffer.add("split", "blue", sequence, payload).rows > 0
    collector = open_collector(tmp_path)
    collector.flush(buffer, "epoch")
    table = table_of(collector, Window("split")).sort_by("row")
    assert table.column("row").to_pylist() == list(range(1000))
    assert table.column("x.2").to_pylist() == x[:, 2].tolist()
    assert set(table.column("request_id").to_pylist()) == {"big"}


def test_undecodable_records_are_left_out_and_counted_and_bad_messages_refused() -> None:
    ((good, part),) = records_of(payloads([request("good", {"x": np.ones((2, 3), np.float32)}, {})])[0])
    x = good["inputs"][0]

    def timed(seconds: float) -> bytes:
        return struct.pack("<d", seconds) + part[8:]

    bad = [
        ({**good, "ids": ["short"], "bytes": len(part) - 8}, part[:-8]),
        ({**good, "ids": ["type"], "inputs": [{**x, "datatype": "COMPLEX"}]}, part),
        ({**good, "ids": ["ragged"], "outputs": [{**x, "name": "y", "shape": [3, 2]}]}, part),
        ({**good, "ids": ["wider"], "inputs": [{**x, "shape": [2, 4]}]}, part),  # more bytes than it has
        ({**good, "ids": ["escape"], "version": "../../etc"}, part),
        ({**good, "ids": ["ancient"]}, timed(-5)),
        ({**good, "ids": ["nan"]}, timed(math.nan)),
        ({**good, "ids": ["count"], "counts": [3]}, part),
        # Counts that wrap around int64 to the right sum must not make a table of 2**63 rows.
        (
            {**good, "ids": ["a", "b", "c"], "counts": [2**63 - 1, 2**63 - 1, 4], "bytes": len(part) + 16},
            part + part[:16],
        ),
        ({**good, "ids": ["one", "two"]}, part),  # two ids, one count
        ({**good, "ids": [5]}, part),
        ({**good, "ids": ["a", "b"], "counts": [1, 1], "offset": 4, "bytes": len(part) + 8}, part[:8] + part),
        (7, b""),
    ]
    message = message_of([(good, part), *bad])
    buffer = CaptureBuffer()
    added = buffer.add("bad", "blue", 1, message)
    assert (added.rows, added.malformed_records) == (2, len(bad))
    assert added.first_error
    refused = [
        *(b"\xff\x00", b"[]\n", b'{"records": 5}\n', b"{}\n", b"null\n"),
        message_of([(good, part[:-1])]),  # the record says it has more bytes than the body holds
        message_of([({**good, "bytes": -8}, b""), (good, part + part[:8])]),
        message_of([({**good, "bytes": "24"}, part)]),
    ]
    for garbage in refused:
        with pytest.raises(MalformedCapture):
            buffer.add("bad", "blue", 2, garbage)
    assert buffer.sequences == [1]
    assert parse_subject("mlmesh.capture.shop.blue") == ("shop", "blue")
    for subject in ("mlmesh.capture.shop", "mlmesh.capture.a.b.c", "mlmesh.capture..x", "other.shop.blue"):
        with pytest.raises(MalformedCapture):
            parse_subject(subject)


def test_sequence_ranges_merge_and_answer_membership() -> None:
    ranges = SequenceRanges()
    ranges.add([5, 1, 2, 3, 9])
    assert [number in ranges for number in range(11)] == [n in (1, 2, 3, 5, 9) for n in range(11)]
    ranges.add_range(4, 4)
    ranges.add_range(6, 8)
    assert len(ranges) == 1 and 9 in ranges and 10 not in ranges
    ranges.add_range(20, 30)
    ranges.add_range(12, 25)
    assert len(ranges) == 2 and all(number in ranges for number in range(12, 31)) and 11 not in ranges


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_flushes_are_recorded_with_their_sequences_and_a_restart_deletes_what_no_commit_recorded(
    tmp_path: Path, database_url: str
) -> None:
    collector = open_collector(tmp_path, database_url)
    files = collector.flush(buffered("shop", [request(f"r{n}", {"x": np.ones((1, 2))}, {}) for n in range(3)]), "e1")
    (kept,) = files
    assert json.loads(kept.sequences) == [[1, 1]]
    folder = (tmp_path / "captures" / kept.path).parent
    orphan = folder / "part-orphan.parquet"  # renamed into place, but its commit never happened
    orphan.write_bytes((tmp_path / "captures" / kept.path).read_bytes())
    (folder / ".part-half.tmp").write_bytes(b"half a file")
    (tmp_path / "captures" / "endpoint=gone" / "deployment=x").mkdir(parents=True)

    reopened = open_collector(tmp_path, database_url)
    assert not orphan.exists() and not (folder / ".part-half.tmp").exists()
    assert (tmp_path / "captures" / kept.path).exists()
    assert not (tmp_path / "captures" / "endpoint=gone").exists()
    assert 1 in reopened.recorded_sequences("e1") and 2 not in reopened.recorded_sequences("e1")
    assert 1 not in reopened.recorded_sequences("another stream")  # a stream made anew counts from 1 again
    assert table_of(reopened, Window("shop")).num_rows == 3


def test_a_data_folder_that_belongs_to_another_database_is_refused(tmp_path: Path) -> None:
    collector = open_collector(tmp_path)
    collector.flush(buffered("shop", [request("r", {"x": np.ones((1, 2))}, {})]), "e1")
    with pytest.raises(FailedPrecondition, match="another collector database"):
        open_collector(tmp_path, database="other.db")
    assert next((tmp_path / "captures").rglob("*.parquet"))  # nothing was deleted


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_retention_deletes_the_oldest_files_first_by_age_and_by_size(tmp_path: Path, database_url: str) -> None:
    collector = open_collector(tmp_path, database_url, default_max_age_seconds=0, default_max_bytes=0)
    now = time.time()
    ages_in_days = [10, 5, 2, 1]
    for sequence, days in enumerate(ages_in_days, start=1):
        old = request(f"d{days}", {"x": np.ones((100, 4))}, {}, moment=now - days * 86_400)
        collector.flush(buffered("aged", [old], first_sequence=sequence), "e1")
    collector.ingest_labels("aged", [LabelInput("d10", 0, number=1)])
    assert collector.enforce_retention(now).files == 0  # no limits: nothing goes

    collector.set_retention("aged", 3 * 86_400, None)
    sweep = collector.enforce_retention(now)
    assert (sweep.files, sweep.rows) == (2, 200)
    assert sorted(set(table_of(collector, Window("aged")).column("request_id").to_pylist())) == ["d1", "d2"]

    sizes = collector.stats("aged").total.bytes
    collector.set_retention("aged", 0, sizes // 2 + 1)
    assert collector.enforce_retention(now).files == 1
    assert set(table_of(collector, Window("aged")).column("request_id").to_pylist()) == {"d1"}
    assert len(list((tmp_path / "captures").rglob("*.parquet"))) == 1
    policy = collector.retention("aged")
    assert (policy.max_age_seconds, policy.max_age_is_default, policy.max_bytes_is_default) == (0, False, False)
    assert collector.set_retention("aged", None, None, use_defaults=True).max_bytes_is_default
    with pytest.raises(InvalidArgument):
        collector.set_retention("aged", -1, None)


def test_flushes_share_the_folder_and_a_deletion_waits_for_them_without_being_starved() -> None:
    lock = _FolderLock()
    order: list[str] = []

    def take(kind: str) -> None:
        with lock.exclusive() if kind == "delete" else lock.shared():
            order.append(kind)

    with lock.shared():  # a flush under way
        with lock.shared():  # a second flush joins it at once
            order.append("second flush")
        deleting = threading.Thread(target=take, args=("delete",))
        deleting.start()
        time.sleep(0.1)
        flushing = threading.Thread(target=take, args=("flush",))  # after the waiting deletion: behind it
        flushing.start()
        time.sleep(0.1)
        assert order == ["second flush"]
    deleting.join(5)
    flushing.join(5)
    assert order == ["second flush", "delete", "flush"]
