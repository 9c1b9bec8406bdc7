"""One job per checkpoint store: leases on real lock files, real processes and Azurite."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.io.hubs.checkpoints import CheckpointScope
from pipeline.io.hubs.lease import LeaseHeld, LeaseLost, LeaseOwner, _blob_module, hold_lease
from tests.test_checkpoints import AZURITE, azurite  # noqa: F401  (the Azurite fixture, reused)

SCOPE = CheckpointScope("local", "$Default")
ROOT = Path(__file__).parent.parent

# A job that takes the lease, says so, and runs until it is killed.
CHILD = """
import sys, time
from pipeline.io.hubs.checkpoints import CheckpointScope
from pipeline.io.hubs.lease import hold_lease
location, namespace, group, duration = sys.argv[1:]
with hold_lease(location, CheckpointScope(namespace, group), lease_duration=int(duration)):
    print("held", flush=True)
    time.sleep(600)
"""


def start_child(location: str, scope: CheckpointScope, lease_duration: int = 60):
    """A process holding the lease, once this returns."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, location, *scope, str(lease_duration)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout.readline().strip() == "held"
    return child


def hold_in_thread(location: str, scope: CheckpointScope, seconds: float, **options):
    """A thread that holds the lease for some seconds; returns once it holds it."""
    held = threading.Event()

    def run():
        with hold_lease(location, scope, **options):
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert held.wait(30)
    return thread


def claim(location: str, scope: CheckpointScope, **options) -> None:
    """Takes the lease and gives it back."""
    with hold_lease(location, scope, **options):
        pass


def me() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}, since "


# --- a local folder ----------------------------------------------------------------------------


def test_a_second_claim_is_refused_naming_the_owner_until_the_first_ends(tmp_path):
    location = str(tmp_path / "checkpoints")
    with hold_lease(location, SCOPE) as lease:
        assert lease.owner.pid == os.getpid()
        with pytest.raises(LeaseHeld) as refused:
            claim(location, SCOPE)
        message = str(refused.value)
        assert message.startswith(f"checkpoints {location} are in use by another bms run ({me()}")
        assert message.endswith("); stop it, or pass --wait-for-lease to wait for it")
        assert "\n" not in message
        assert refused.value.owner == lease.owner
        assert refused.value.owner.since.endswith("Z")
        claim(location, SCOPE._replace(consumer_group="other"))  # another store
    lease_file = tmp_path / "checkpoints/local/%24Default/.lease"
    assert lease_file.exists() and lease_file.read_text() == ""  # no owner named once released
    with hold_lease(location, SCOPE):
        assert LeaseOwner.from_dict(json.loads(lease_file.read_text())).pid == os.getpid()


def test_the_lease_is_released_when_the_job_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), hold_lease(str(tmp_path), SCOPE):
        raise RuntimeError("boom")
    claim(str(tmp_path), SCOPE)


def test_waiting_claims_the_lease_when_its_owner_releases_it(tmp_path):
    holder = hold_in_thread(str(tmp_path), SCOPE, 1.0)
    started = time.monotonic()
    with hold_lease(str(tmp_path), SCOPE, wait=True, wait_poll=0.05):
        waited = time.monotonic() - started
    holder.join()
    assert 0.8 < waited < 10


def test_a_killed_owner_never_blocks_the_next_job(tmp_path):
    location = str(tmp_path)
    child = start_child(location, SCOPE)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {child.pid} on host ") as refused:
            claim(location, SCOPE)
        assert refused.value.owner.pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with hold_lease(location, SCOPE) as lease:  # at once: the kernel dropped the dead one's lock
        assert lease.owner.pid == os.getpid()


# --- Blob Storage on Azurite -------------------------------------------------------------------


def unavailable(reason: str):
    """Skips locally; under CI a missing service is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the blob lease tests)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def storage(request) -> str:
    """A connection string to Azurite's blob service (test_checkpoints' fixture)."""
    try:
        import azure.eventhub.extensions.checkpointstoreblob  # noqa: F401
    except ImportError:
        unavailable("the azure extra is not installed: pip install -e '.[azure]'")
    if shutil.which("azurite-blob") is None and not AZURITE.exists():
        unavailable("Azurite is not installed: run scripts/setup-services")
    return request.getfixturevalue("azurite")


CONTAINERS = itertools.count()


@pytest.fixture
def container(storage, monkeypatch):
    """``blob:NAME`` of a new container, with the connection string in the environment."""
    name = f"leases-{next(CONTAINERS)}"
    with _blob_module().ContainerClient.from_connection_string(storage, name) as client:
        client.create_container()
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", storage)
        yield f"blob:{name}", client


BLOB_SCOPE = CheckpointScope("ns.servicebus.windows.net", "bms")
BLOB_NAME = "ns.servicebus.windows.net/bms/ownership/bms-lease"


@pytest.mark.parametrize(
    "scope, blob_name",
    [
        (BLOB_SCOPE, BLOB_NAME),
        # The local hub's scope (its file's path) and the SDK's lower-cased names:
        (CheckpointScope("/data/Hub.db", "$Default"), "/data/hub.db/$default/ownership/bms-lease"),
    ],
)
def test_a_second_blob_claim_is_refused_naming_the_owner_until_the_first_ends(
    container, scope, blob_name
):
    location, client = container
    with hold_lease(location, scope) as lease:
        properties = client.get_blob_client(blob_name).get_blob_properties()
        assert properties.lease.state == "leased" and properties.lease.duration == "fixed"
        assert properties.metadata["owner_pid"] == str(os.getpid())
        with pytest.raises(LeaseHeld) as refused:
            claim(location, scope)
        assert str(refused.value).startswith(
            f"checkpoints {location} are in use by another bms run ({me()}"
        )
        assert refused.value.owner == lease.owner
        claim(location, scope._replace(consumer_group="other"))  # another store
    properties = client.get_blob_client(blob_name).get_blob_properties()
    assert properties.lease.state == "available" and properties.metadata == {}
    claim(location, scope)


def test_waiting_claims_the_blob_lease_when_its_owner_releases_it(container):
    location, _ = container
    holder = hold_in_thread(location, BLOB_SCOPE, 1.0)
    started = time.monotonic()
    with hold_lease(location, BLOB_SCOPE, wait=True, wait_poll=0.1) as lease:
        waited = time.monotonic() - started
        assert lease.lost is None
    holder.join()
    assert 0.8 < waited < 10


def test_a_broken_blob_lease_is_reported_lost(container):
    location, client = container
    lost: list[str] = []
    with hold_lease(location, BLOB_SCOPE, on_lost=lost.append, renew_interval=0.2) as lease:
        deadline = time.monotonic() + 10
        while not lease.renewals and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.renewals and not lost
        lease.check()  # still held
        blob = client.get_blob_client(BLOB_NAME)
        _blob_module().BlobLeaseClient(blob).break_lease(lease_break_period=0)
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lost) == 1 and "renewing it failed" in lost[0]
        assert lease.lost == lost[0]
        with pytest.raises(LeaseLost, match="lost: renewing it failed"):
            lease.check()
        claim(location, BLOB_SCOPE)  # another job can claim it now
    # Leaving a lost lease raises nothing (the block's outcome stands).


def test_a_renewed_blob_lease_outlives_its_duration_and_a_killed_owners_expires(container):
    """Blob Storage's shortest lease is 15 s: one wait of ~16 s checks both ends."""
    location, _ = container
    killed_scope = BLOB_SCOPE._replace(consumer_group="killed")
    child = start_child(location, killed_scope, lease_duration=15)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {child.pid} on host "):
            claim(location, killed_scope)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed = time.monotonic()
    with hold_lease(location, BLOB_SCOPE, lease_duration=15, renew_interval=1) as lease:
        with pytest.raises(LeaseHeld):  # the dead job's lease lives on until it expires
            claim(location, killed_scope)
        with hold_lease(location, killed_scope, wait=True, wait_poll=0.5):
            expired_after = time.monotonic() - killed
        time.sleep(max(0.0, 16.5 - (time.monotonic() - killed)))
        with pytest.raises(LeaseHeld):  # still ours, 16.5 s into a 15 s lease
            claim(location, BLOB_SCOPE)
        assert lease.renewals >= 10 and lease.lost is None
    assert 10 < expired_after < 25
