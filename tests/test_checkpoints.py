"""Checkpoint stores and start positions, on the real local hub and real files."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.io.hubs import OutgoingEvent, checkpoint_scope
from pipeline.io.hubs.checkpoints import (
    BlobCheckpointStore,
    CheckpointScope,
    FileCheckpointStore,
    open_checkpoint_store,
    resume_positions,
)
from pipeline.io.hubs.local import LocalHub
from pipeline.io.hubs.positions import StartPosition, first_sequence_number
from pipeline.schema import datetime_to_micros
from tests.conftest import missing, produce_into

SCOPE = CheckpointScope("local", "$Default")


def test_file_store_commits_move_forward_only_and_resume_after_the_last(tmp_path):
    store = FileCheckpointStore(tmp_path, SCOPE)
    assert store.last_processed("bookingtopic") == {}
    store.commit("bookingtopic", "0", 10, offset="5120")
    store.commit("bookingtopic", "0", 7)  # a late commit of an older position
    store.commit("bookingtopic", "1", 3)
    store.commit("paymentstopic", "0", 99)
    reopened = FileCheckpointStore(tmp_path, SCOPE)
    assert reopened.last_processed("bookingtopic") == {"0": 10, "1": 3}
    assert resume_positions(reopened, "bookingtopic") == {"0": 11, "1": 4}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left
    record = json.loads(next(tmp_path.rglob("0.json")).read_text())
    assert record["sequence_number"] == 10 and record["offset"] == "5120"


def test_checkpoint_locations_and_scopes_follow_the_hub_url(tmp_path, monkeypatch):
    folder_store = open_checkpoint_store(str(tmp_path), SCOPE)
    assert isinstance(folder_store, FileCheckpointStore)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    with pytest.raises(ValueError, match="AZURE_STORAGE_CONNECTION_STRING"):
        open_checkpoint_store("blob:bms-checkpoints", SCOPE)
    pytest.importorskip("azure.eventhub.extensions.checkpointstoreblob")
    url = "https://account.blob.core.windows.net/bms-checkpoints"
    assert isinstance(open_checkpoint_store(url, SCOPE), BlobCheckpointStore)

    # Two local hub files never share progress; the same file reached two ways does.
    assert checkpoint_scope(str(tmp_path / "a.db")) != checkpoint_scope(str(tmp_path / "b.db"))
    monkeypatch.chdir(tmp_path)
    assert checkpoint_scope("local:a.db") == checkpoint_scope(str(tmp_path / "a.db"))
    monkeypatch.delenv("EVENTHUB_CONNECTION_STRING", raising=False)
    eventhubs = checkpoint_scope("eventhubs://ns.servicebus.windows.net?consumer_group=bms")
    assert eventhubs == CheckpointScope("ns.servicebus.windows.net", "bms")
    monkeypatch.setenv(
        "EVENTHUB_CONNECTION_STRING",
        "Endpoint=sb://other.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s",
    )
    assert checkpoint_scope("eventhubs://") == CheckpointScope(
        "other.servicebus.windows.net", "$Default"
    )


def test_file_store_scopes_are_separate(tmp_path):
    FileCheckpointStore(tmp_path, SCOPE).commit("bookingtopic", "0", 5)
    other = FileCheckpointStore(tmp_path, CheckpointScope("ns.servicebus.windows.net", "bms/x"))
    assert other.last_processed("bookingtopic") == {}
    other.commit("bookingtopic", "0", 1)
    assert FileCheckpointStore(tmp_path, SCOPE).last_processed("bookingtopic") == {"0": 5}


def test_a_failed_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = FileCheckpointStore(tmp_path, SCOPE)
    store.commit("bookingtopic", "0", 5)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.io.hubs.checkpoints.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.commit("bookingtopic", "0", 9)
    monkeypatch.undo()
    assert store.last_processed("bookingtopic") == {"0": 5}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_start_positions_parse():
    assert StartPosition.parse("earliest") == StartPosition.earliest()
    assert StartPosition.parse("latest") == StartPosition.latest()
    assert StartPosition.parse("2026-02-08T10:00:00Z") == StartPosition.at_time(
        datetime_to_micros(dt.datetime(2026, 2, 8, 10))
    )
    assert StartPosition.parse("1:7, 0:3") == StartPosition.at_sequence_numbers({"0": 3, "1": 7})
    with pytest.raises(ValueError, match="not a start position"):
        StartPosition.parse("yesterday")


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        yield hub


BASE = datetime_to_micros(dt.datetime(2026, 2, 8, 10))


def test_first_sequence_number_for_each_kind_of_start(hub):
    hub.append("bookingtopic", [OutgoingEvent(None, b"x", BASE + n * 1_000_000) for n in range(10)])
    at = first_sequence_number
    assert at(hub, "bookingtopic", "0", StartPosition.earliest()) == 0
    assert at(hub, "bookingtopic", "0", StartPosition.latest()) == 10
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE + 3_500_000)) == 4
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE - 1)) == 0
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE + 10**9)) == 10
    assert at(hub, "bookingtopic", "0", StartPosition.at_sequence_numbers({"0": 6})) == 6
    assert at(hub, "bookingtopic", "0", StartPosition.latest(), resume_at=3) == 3
    # Starts beyond the partition's next event are moved down to it.
    assert at(hub, "bookingtopic", "0", StartPosition.at_sequence_numbers({"0": 60})) == 10
    assert at(hub, "bookingtopic", "0", StartPosition.earliest(), resume_at=99) == 10


@given(
    gaps=st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=40),
    target=st.integers(min_value=-2, max_value=130),
)
def test_enqueued_time_start_is_the_first_event_at_or_after_it(tmp_path_factory, gaps, target):
    with LocalHub(tmp_path_factory.mktemp("hub") / "hub.db", partitions=1) as hub:
        times = [sum(gaps[: i + 1]) for i in range(len(gaps))]  # never decreasing, with ties
        hub.append("bookingtopic", [OutgoingEvent(None, b"x", BASE + t) for t in times])
        found = first_sequence_number(
            hub, "bookingtopic", "0", StartPosition.at_time(BASE + target)
        )
        assert found == next((i for i, t in enumerate(times) if t >= target), len(times))


AZURITE = Path(__file__).parent.parent / ".bms/tools/azurite/node_modules/.bin/azurite-blob"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite's blob service on a free port, with an account whose key this run makes up."""
    executable = shutil.which("azurite-blob") or (str(AZURITE) if AZURITE.exists() else None)
    if executable is None:
        missing("Azurite is not installed: run scripts/setup-services")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = base64.b64encode(os.urandom(64)).decode()
    process = subprocess.Popen(
        [executable, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--silent",
         "--skipApiVersionCheck", "--disableTelemetry",
         "--location", str(tmp_path_factory.mktemp("azurite"))],
        env={**os.environ, "AZURITE_ACCOUNTS": f"bmstest:{key}"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("Azurite did not start")
            time.sleep(0.1)
        yield (
            f"DefaultEndpointsProtocol=http;AccountName=bmstest;AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/bmstest;"
        )
    finally:
        process.terminate()
        process.wait(timeout=10)


def sdk_store_in_new_container(connection_string: str, container: str):
    """The Event Hubs SDK's own blob checkpoint store, in a container made for it (the README
    creates it with az)."""
    from azure.eventhub.extensions.checkpointstoreblob import BlobCheckpointStore as SdkStore

    sdk_store = SdkStore.from_connection_string(connection_string, container)
    sdk_store._container_client.create_container()
    return sdk_store


def test_blob_store_in_the_sdk_layout_on_azurite(azurite):
    sdk_store = sdk_store_in_new_container(azurite, "checkpoints")
    scope = CheckpointScope("ns.servicebus.windows.net", "bms")
    store = BlobCheckpointStore(scope, "checkpoints", connection_string=azurite)
    assert store.last_processed("bookingtopic") == {}
    store.commit("bookingtopic", "0", 41, offset="20992")
    store.commit("bookingtopic", "0", 12, offset="6144")  # older: ignored
    store.commit("bookingtopic", "3", 7, offset="3584")
    store.commit("bookingtopic", "3", 9)  # no offset: never written with a made-up one
    store.commit("paymentstopic", "0", 1, offset="512")
    again = BlobCheckpointStore(scope, "checkpoints", connection_string=azurite)
    assert resume_positions(again, "bookingtopic") == {"0": 42, "3": 8}
    other_group = BlobCheckpointStore(scope._replace(consumer_group="x"), "checkpoints", azurite)
    assert other_group.last_processed("bookingtopic") == {}
    # The SDK's own processor finds them where it looks for checkpoints:
    listed = sdk_store.list_checkpoints("ns.servicebus.windows.net", "bookingtopic", "bms")
    assert sorted((c["partition_id"], c["sequence_number"], c["offset"]) for c in listed) == [
        ("0", 41, "20992"),
        ("3", 7, "3584"),
    ]
    store.close()
    again.close()
    other_group.close()
    sdk_store.close()


def test_the_pipeline_commits_to_blob_storage_and_resumes_from_it(
    azurite, tmp_path, monkeypatch, capsys
):
    sdk_store_in_new_container(azurite, "pipeline").close()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite)
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "600", "--seed", "4", "--simulate", "2026-02-08T10:00:00Z")
    run = ["run", "--bounded", "--hub", str(hub), "--checkpoints", "blob:pipeline"]
    run += ["--warehouse", f"sqlite:///{tmp_path / 'warehouse.db'}"]
    assert main(run) == 0
    store = BlobCheckpointStore(checkpoint_scope(str(hub)), "pipeline", connection_string=azurite)
    committed = store.last_processed("bookingtopic")
    assert committed and all(n >= 0 for n in committed.values())
    capsys.readouterr()
    assert main(run) == 0  # nothing new: it reads only the window behind the checkpoints
    read_again = int(re.search(r"bookingtopic (\d+)", capsys.readouterr().out).group(1))
    with LocalHub(hub) as client:
        total = sum(
            client.partition_properties("bookingtopic", p).last_sequence_number + 1
            for p in client.partition_ids("bookingtopic")
        )
    assert read_again == total - sum(n + 1 for n in committed.values()) < total
    store.close()
