"""A throwaway PostgreSQL cluster for fault-injection tests: its own data directory, port and
unix socket, so a test may stop it mid-stream and start it again on the same port without
touching the shared cluster on 5432 that ``scripts/setup-services`` starts.

    with ThrowawayPostgres() as pg:        # initdb + start; close() stops it and removes it all
        engine = sa.create_engine(pg.url)
        ...
        pg.stop()                          # fast shutdown ("immediate" = crash-like)
        pg.start()                         # same port, same data

In a test module, ``postgres = throwaway_postgres_fixture()`` gives tests a started cluster;
a missing PostgreSQL is a skip locally and a failure under CI (``CI`` set).

Uses the newest ``/usr/lib/postgresql/*/bin`` (or ``$BMS_PG_BINDIR``). initdb and postgres
refuse to run as root: as root they run as the ``postgres`` OS user, which then owns the
cluster's temp directory. The cluster listens on 127.0.0.1 only; unix-socket connections are
trusted (the ``postgres`` superuser uses them), TCP connections need the password of role
``bms`` (password ``bms``), which owns database ``bms``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import missing

PG_ROOT = Path("/usr/lib/postgresql")
SETUP_HINT = "run scripts/setup-services"
HOST = "127.0.0.1"
OS_USER = "postgres"  # who runs initdb and postgres when we are root


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/VERSION/bin`` holding initdb and pg_ctl, or
    ``$BMS_PG_BINDIR`` when set."""
    override = os.environ.get("BMS_PG_BINDIR")
    candidates = [Path(override)] if override else _versioned_bin_dirs()
    for candidate in candidates:
        if all(os.access(candidate / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    where = override or f"{PG_ROOT}/*/bin"
    raise PostgresNotInstalled(f"no PostgreSQL server binaries (initdb, pg_ctl) in {where}")


def _versioned_bin_dirs() -> list[Path]:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (-1,)

    versions = sorted(PG_ROOT.glob("*/"), key=version, reverse=True) if PG_ROOT.is_dir() else []
    return [path / "bin" for path in versions]


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temp directory, on 127.0.0.1:``port``.

    The constructor runs initdb (about a second); ``start()`` also creates role and database
    ``bms`` the first time. The port is picked once and kept across stop/start, so a client's
    URL stays valid. Usable as a context manager: entering starts it, leaving closes it.
    """

    user = "bms"
    password = "bms"
    database = "bms"

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None):
        self.bin_dir = postgres_bin_dir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                self._owner = pwd.getpwnam(OS_USER)
            except KeyError:
                raise PostgresNotInstalled(f"no OS user {OS_USER!r} to run PostgreSQL") from None
        # Under /tmp (not pytest's tmp_path, whose parents are 0700 root): the postgres OS user
        # must reach it, and unix socket paths must stay short (107 bytes).
        parent = "/tmp" if os.path.isdir("/tmp") else None  # not $TMPDIR: may be 0700 or long
        self.dir = Path(tempfile.mkdtemp(prefix="bms-pg-", dir=parent))
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir  # -k: the socket never lands in /var/run/postgresql
        self.log_file = self.dir / "postgres.log"
        self.port = port or free_port()
        self._running = False
        self._provisioned = False
        try:
            if self._as_root:
                os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
            self._initdb(settings or {})
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    # -- what clients use -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3) of database ``bms`` as role ``bms``."""
        return (
            f"postgresql+psycopg://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"
        )

    @property
    def odbc(self) -> str:
        """ODBC connection string for the psqlODBC driver (``odbc-postgresql``)."""
        return (
            f"Driver={{PostgreSQL Unicode}};Server={HOST};Port={self.port};"
            f"Database={self.database};Uid={self.user};Pwd={self.password}"
        )

    @property
    def running(self) -> bool:
        return self._running

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Starts the server and waits until it accepts connections (no-op if running)."""
        if self._running:
            return
        self._wait_for_port(timeout)
        result = self._pg_ctl("start", "-w", "-t", str(int(timeout)), "-l", str(self.log_file))
        if result.returncode != 0:
            raise RuntimeError(self._failure("pg_ctl start", result))
        self._running = True
        if not self._provisioned:
            self._provision()

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stops the server: ``fast`` (roll back open transactions, disconnect clients, clean
        shutdown), ``immediate`` (kill at once, like a crash: recovery on the next start) or
        ``smart`` (wait for clients to disconnect). No-op if stopped."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if not self._running:
            return
        result = self._pg_ctl("stop", "-m", mode, "-w", "-t", str(int(timeout)))
        if result.returncode != 0 and self._pg_ctl("status").returncode != 3:  # 3: not running
            raise RuntimeError(self._failure(f"pg_ctl stop -m {mode}", result))
        self._running = False

    def restart(self, mode: str = "fast", down_for: float = 0, timeout: float = 30) -> None:
        """stop(mode), stay down ``down_for`` seconds, start() on the same port."""
        self.stop(mode, timeout)
        if down_for:
            time.sleep(down_for)
        self.start(timeout)

    @contextlib.contextmanager
    def down(self, mode: str = "fast") -> Iterator[None]:
        """Stopped inside the block, started again when it ends (also on errors)."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stops the server (immediate: nothing to keep) and removes the temp directory."""
        try:
            if self._running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<ThrowawayPostgres {HOST}:{self.port} {state} in {self.dir}>"

    # -- superuser access over the unix socket ----------------------------------------------

    def psql(self, *statements: str, database: str = "postgres") -> str:
        """Runs SQL as superuser ``postgres`` over the unix socket, each argument in its own
        transaction; returns psql's output (unaligned, tuples only). For test setup and fault
        injection (``pg_terminate_backend`` ...)."""
        commands = [part for sql in statements for part in ("-c", sql)]
        result = self._run(
            [
                str(self.bin_dir / "psql"),
                "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
                "-d", database, *commands,
            ]
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(self._failure("psql", result, log=False))
        return result.stdout

    # -- internals ----------------------------------------------------------------------------

    def _initdb(self, settings: dict[str, str]) -> None:
        result = self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C.UTF-8",
                "--no-sync",
            ]
        )  # fmt: skip
        if result.returncode != 0 and "C.UTF-8" in result.stderr:  # no such locale here
            shutil.rmtree(self.data_dir, ignore_errors=True)
            result = self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D", str(self.data_dir), "-U", "postgres",
                    "--auth-local=trust", "--auth-host=scram-sha-256",
                    "-E", "UTF8", "--locale=C", "--no-sync",
                ]
            )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(self._failure("initdb", result, log=False))
        conf = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "50",
            "shared_buffers": "16MB",
            # Only an OS crash loses unsynced data; stop -m immediate is recovered from WAL.
            "fsync": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            **settings,
        }
        lines = "".join(f"{name} = {value}\n" for name, value in conf.items())
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as file:
            file.write("\n# ThrowawayPostgres\n" + lines)

    def _provision(self) -> None:
        self.psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )
        self._provisioned = True

    def _wait_for_port(self, timeout: float) -> None:
        """A server that just exited may leave the port briefly taken (or someone grabbed it)."""
        deadline = time.monotonic() + min(timeout, 10)
        while not port_is_free(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} is taken: cannot start {self!r}")
            time.sleep(0.1)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args])

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        if self._as_root:
            if shutil.which("runuser"):
                command = ["runuser", "-u", OS_USER, "--", *command]
            else:
                command = ["su", OS_USER, "-s", "/bin/sh", "-c", shlex.join(command)]
        env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
        for name in ("PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGPASSWORD"):
            env.pop(name, None)
        # cwd: the postgres OS user must be able to stand in it (not /root)
        return subprocess.run(
            command, cwd=self.dir, env=env, capture_output=True, text=True, check=False
        )

    def _failure(self, what: str, result: subprocess.CompletedProcess, log: bool = True) -> str:
        message = f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
        if log and self.log_file.exists():
            tail = self.log_file.read_text(errors="replace").splitlines()[-20:]
            message += "\nserver log:\n" + "\n".join(tail)
        return message


def throwaway_postgres(**kwargs) -> ThrowawayPostgres:
    """A started ThrowawayPostgres, or a skip (a failure under CI) where PostgreSQL is missing.
    The caller closes it."""
    try:
        cluster = ThrowawayPostgres(**kwargs)
    except PostgresNotInstalled as error:
        missing(f"{error}; {SETUP_HINT}")
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


def throwaway_postgres_fixture(scope: str = "function", **kwargs) -> Callable:
    """A pytest fixture giving a started cluster, closed after the test (or module, with
    ``scope="module"``). In a test module: ``postgres = throwaway_postgres_fixture()``, then
    ``def test_something(postgres): ...``.
    """
    import pytest

    @pytest.fixture(scope=scope)
    def fixture() -> Iterator[ThrowawayPostgres]:
        cluster = throwaway_postgres(**kwargs)
        try:
            yield cluster
        finally:
            cluster.close()

    return fixture
