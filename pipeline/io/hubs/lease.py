"""One job per checkpoint store: a lease that a running ``bms run`` holds on its checkpoints.

Two jobs committing to the same checkpoints would each resume from the other's positions and write
every row twice. So a job claims its checkpoint store (one scope: namespace and consumer group)
before it reads, as an Event Hubs SDK processor claims its partitions: the claim is a lease that
is renewed while the job runs, released when it exits, and that *ends by itself* when its owner
crashes, so a dead job never blocks the next one. A job that finds the lease held stops with one
line naming the owner (pid, host, since when), or waits until the lease is free.

Where the lease lives follows the checkpoint location (``open_checkpoint_store``'s syntax):

  - A folder: the lock file ``FOLDER/NAMESPACE/CONSUMER_GROUP/.lease`` (the folder layout of
    ``FileCheckpointStore``), locked with ``flock(LOCK_EX | LOCK_NB)`` on a file descriptor kept
    open for the lease's lifetime. The kernel releases the lock when that descriptor is closed,
    which it does when the process dies, even on ``kill -9``: a crashed owner's lease ends at
    once, and there is nothing to renew. The owner (pid, host, since) is written into the file
    after locking, so a refused job can name it; it is cleared on release. The file itself is
    never deleted (deleting a lock file races with processes that have just opened it). flock
    locks belong to an open file description, so two claims in one process conflict as well.
    Processes forked (not exec'd) while the lease is held share the lock, as part of the job.
  - A blob container (``https://ACCOUNT.blob.core.windows.net/CONTAINER`` with
    DefaultAzureCredential, or ``blob:CONTAINER`` with ``AZURE_STORAGE_CONNECTION_STRING``): the
    blob ``NAMESPACE/CONSUMER_GROUP/ownership/bms-lease`` (lower-cased, as the SDK names its
    ``NAMESPACE/HUB/CONSUMER_GROUP/ownership/PARTITION`` blobs; one level shorter, so never one of
    them). The blob is created empty if missing, then leased for 60 s with Blob Storage's own
    lease; the owner is recorded in the blob's metadata. A daemon thread renews the lease every
    15 s; a crashed owner stops renewing and its lease expires after 60 s. If the service says
    the lease is gone (broken, taken, the blob deleted) or no renewal succeeded for a whole lease
    duration, the lease is *lost*: ``on_lost(reason)`` is called from the renewal thread and
    ``Lease.check()`` raises ``LeaseLost`` from then on.

The blob client is azure-storage-blob when installed, else the copy vendored inside
azure-eventhub-checkpointstoreblob (the ``azure`` extra), which has the same API.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, Protocol

from pipeline.io.azure import default_credential, import_extra, storage_connection_string
from pipeline.io.hubs.checkpoints import CheckpointScope, _safe_name

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "LeaseOwner", "hold_lease"]

logger = logging.getLogger(__name__)

LEASE_FILE = ".lease"
LEASE_BLOB = "bms-lease"
# The API version the Event Hubs SDK's blob checkpoint store pins: whatever serves the
# checkpoints serves the lease.
BLOB_API_VERSION = "2019-07-07"
# How long a refused claim looks again for an owner that has the lease but has not written its
# name yet.
_OWNER_GRACE = 1.0


class LeaseOwner(NamedTuple):
    """Who holds a lease: process id, host name and when it claimed it (ISO 8601 UTC)."""

    pid: int
    host: str
    since: str

    @classmethod
    def current(cls) -> LeaseOwner:
        """This process, now."""
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(os.getpid(), socket.gethostname(), since)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"

    def to_dict(self) -> dict[str, str]:
        return {"pid": str(self.pid), "host": self.host, "since": self.since}

    @classmethod
    def from_dict(cls, record: Any) -> LeaseOwner | None:
        """The owner a lease file or blob metadata names, or None if it names none."""
        try:
            return cls(int(record["pid"]), str(record["host"]), str(record["since"]))
        except (KeyError, TypeError, ValueError):
            return None


class LeaseHeld(Exception):
    """The checkpoint store is leased by another job. ``owner`` is None when the holder has not
    recorded its name (it is claiming at this very moment)."""

    def __init__(self, location: str, owner: LeaseOwner | None):
        self.location = location
        self.owner = owner
        who = f" ({owner.describe()})" if owner else ""
        super().__init__(
            f"checkpoints {location} are in use by another bms run{who}; stop it, or pass "
            "--wait-for-lease to wait for it"
        )


class LeaseLost(Exception):
    """A held lease ended while the job ran: another job may be using the checkpoints now."""


class Lease:
    """A lease held by this process (what ``hold_lease`` yields)."""

    def __init__(self, location: str, owner: LeaseOwner):
        self.location = location
        self.owner = owner
        self.lost: str | None = None
        self.renewals = 0

    def __repr__(self) -> str:
        state = f"lost: {self.lost}" if self.lost else "held"
        return f"Lease({self.location!r}, {self.owner.describe()}, {state})"

    def check(self) -> None:
        """Raises LeaseLost if the lease has been lost."""
        if self.lost:
            raise LeaseLost(f"lease on checkpoints {self.location} lost: {self.lost}")


class _Taken(Exception):
    def __init__(self, owner: LeaseOwner | None):
        self.owner = owner


class _Backend(Protocol):
    def acquire(self, owner: LeaseOwner) -> None:
        """Claims the lease, or raises _Taken naming its holder."""
        ...

    def start(self, lease: Lease, on_lost: Callable[[str], None] | None) -> None: ...

    def release(self) -> None: ...


@contextlib.contextmanager
def hold_lease(
    location: str,
    scope: CheckpointScope,
    *,
    wait: bool = False,
    wait_poll: float = 1.0,
    on_lost: Callable[[str], None] | None = None,
    lease_duration: int = 60,
    renew_interval: float | None = None,
) -> Iterator[Lease]:
    """Holds the lease on the checkpoint store at ``location`` for ``scope`` while in the block.

    Args:
      location: a checkpoint location, as ``open_checkpoint_store`` takes it.
      wait: when the lease is held by another job, poll every ``wait_poll`` seconds until it is
        free (printing nothing) instead of raising LeaseHeld.
      on_lost: called with a reason, from the renewal thread, if a blob lease is lost.
      lease_duration, renew_interval: of blob leases, in seconds, for tests (Blob Storage accepts
        durations of 15 to 60 s); a lease is renewed every quarter of its duration by default.

    Raises:
      LeaseHeld: the lease is held by another job (or another claim in this process).
    """
    if renew_interval is None:
        renew_interval = lease_duration / 4
    if renew_interval >= lease_duration:
        raise ValueError("renew_interval must be shorter than lease_duration")
    display = _display(location)
    backend = _backend(location, scope, lease_duration, renew_interval)
    try:
        owner = _claim(backend, display, wait, wait_poll)
        lease = Lease(display, owner)
        try:
            backend.start(lease, on_lost)
            yield lease
        finally:
            backend.release()
    finally:
        _close(backend)


def _claim(backend: _Backend, display: str, wait: bool, wait_poll: float) -> LeaseOwner:
    unnamed_until = time.monotonic() + _OWNER_GRACE
    while True:
        owner = LeaseOwner.current()
        try:
            backend.acquire(owner)
            return owner
        except _Taken as taken:
            if wait:
                time.sleep(wait_poll)
            elif taken.owner is None and time.monotonic() < unnamed_until:
                time.sleep(0.05)  # the holder is between locking and writing its name
            else:
                raise LeaseHeld(display, taken.owner) from None


def _display(location: str) -> str:
    """The location as a message may show it: without a query string (a SAS token)."""
    return location.split("?", 1)[0]


def _backend(
    location: str, scope: CheckpointScope, lease_duration: int, renew_interval: float
) -> _Backend:
    if location.startswith("https://"):
        blob = _blob_module()
        account, _, name = location.rstrip("/").rpartition("/")
        client = blob.ContainerClient(
            account, name, credential=default_credential(), api_version=BLOB_API_VERSION
        )
        return _BlobLease(client, scope, lease_duration, renew_interval)
    if location.startswith("blob:"):
        connection_string = storage_connection_string(location)
        blob = _blob_module()
        client = blob.ContainerClient.from_connection_string(
            connection_string, location.removeprefix("blob:"), api_version=BLOB_API_VERSION
        )
        return _BlobLease(client, scope, lease_duration, renew_interval)
    return _FileLease(Path(location), scope)


def _close(backend: _Backend) -> None:
    close = getattr(backend, "close", None)
    if close is not None:
        close()


class _FileLease:
    """An flock'ed file; see the module docstring."""

    def __init__(self, folder: Path, scope: CheckpointScope):
        self.path = folder / _safe_name(scope.namespace) / _safe_name(scope.consumer_group)
        self.path /= LEASE_FILE
        self._fd: int | None = None

    def acquire(self, owner: LeaseOwner) -> None:
        import fcntl  # POSIX only: imported here so that the module imports everywhere

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(fd)
            os.close(fd)
            raise _Taken(holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner.to_dict()).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # unlocks
            raise
        self._fd = fd

    def start(self, lease: Lease, on_lost: Callable[[str], None] | None) -> None:
        """Nothing to renew: the kernel holds the lock until the descriptor closes."""

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # name no owner once released (still locked here)
        except OSError as error:
            logger.warning("could not clear the owner in %s: %s", self.path, error)
        finally:
            os.close(fd)  # unlocks


def _read_owner(fd: int) -> LeaseOwner | None:
    try:
        return LeaseOwner.from_dict(json.loads(os.pread(fd, 4096, 0)))
    except (OSError, ValueError):
        return None


def _blob_module() -> ModuleType:
    try:
        import azure.storage.blob as blob
    except ImportError:
        return import_extra(
            "azure.eventhub.extensions.checkpointstoreblob._vendor.storage.blob", "azure"
        )
    return blob


# The service's answers that mean a lease is no longer ours: 404 (the blob is gone), 409 (lease
# broken, taken, or not present) and 412 (a condition on the lease failed).
_LOST_STATUSES = frozenset({404, 409, 412})


class _BlobLease:
    """A Blob Storage lease on one blob, renewed by a daemon thread; see the module docstring."""

    def __init__(
        self, container: Any, scope: CheckpointScope, lease_duration: int, renew_interval: float
    ):
        self._container = container
        name = f"{scope.namespace}/{scope.consumer_group}/ownership/{LEASE_BLOB}".lower()
        self._blob = container.get_blob_client(name)
        self._lease_duration = lease_duration
        self._renew_interval = renew_interval
        self._client_lease: Any = None
        self._lease: Lease | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, owner: LeaseOwner) -> None:
        from azure.core.exceptions import (
            HttpResponseError,
            ResourceExistsError,
            ResourceNotFoundError,
        )

        try:
            try:
                client_lease = self._blob.acquire_lease(lease_duration=self._lease_duration)
            except ResourceNotFoundError:  # the first job on these checkpoints
                with contextlib.suppress(ResourceExistsError):  # or another job's just now
                    self._blob.upload_blob(b"", overwrite=False)
                client_lease = self._blob.acquire_lease(lease_duration=self._lease_duration)
        except HttpResponseError as error:
            if error.status_code != 409:  # 409 LeaseAlreadyPresent
                raise
            raise _Taken(self._read_owner()) from None
        try:
            self._blob.set_blob_metadata(_owner_metadata(owner), lease=client_lease)
        except BaseException:
            with contextlib.suppress(Exception):
                client_lease.release()
            raise
        self._client_lease = client_lease

    def _read_owner(self) -> LeaseOwner | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            metadata = self._blob.get_blob_properties().metadata or {}
        except ResourceNotFoundError:
            return None
        return LeaseOwner.from_dict({key.removeprefix("owner_"): v for key, v in metadata.items()})

    def start(self, lease: Lease, on_lost: Callable[[str], None] | None) -> None:
        self._lease, self._on_lost = lease, on_lost
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True)
        self._thread.name = "bms-lease-renewal"
        self._thread.start()

    def renew(self) -> None:
        """Renews the lease once; raises what the service answers."""
        self._client_lease.renew()
        assert self._lease is not None
        self._lease.renewals += 1

    def _renew_until_stopped(self) -> None:
        from azure.core.exceptions import HttpResponseError

        renewed = time.monotonic()
        while not self._stop.wait(self._renew_interval):
            try:
                self.renew()
                renewed = time.monotonic()
            except Exception as error:
                reason = f"renewing it failed: {type(error).__name__}: {_first_line(error)}"
                status = error.status_code if isinstance(error, HttpResponseError) else None
                if status in _LOST_STATUSES:
                    self._lose(reason)
                    return
                if time.monotonic() - renewed >= self._lease_duration:
                    self._lose(f"not renewed for {self._lease_duration} s; {reason}")
                    return
                logger.warning("lease on checkpoints: %s; retrying", reason)

    def _lose(self, reason: str) -> None:
        assert self._lease is not None
        self._lease.lost = reason
        if self._on_lost is not None:
            self._on_lost(reason)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        client_lease, self._client_lease = self._client_lease, None
        if client_lease is None or (self._lease is not None and self._lease.lost):
            return
        try:
            self._blob.set_blob_metadata({}, lease=client_lease)  # name no owner once released
            client_lease.release()
        except Exception as error:  # it expires by itself
            logger.warning(
                "could not release the lease on checkpoints (it expires in %s s): %s",
                self._lease_duration,
                _first_line(error),
            )

    def close(self) -> None:
        self._container.close()


def _owner_metadata(owner: LeaseOwner) -> dict[str, str]:
    """Blob metadata values are ASCII."""
    return {
        f"owner_{key}": value.encode("ascii", "backslashreplace").decode()
        for key, value in owner.to_dict().items()
    }


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
