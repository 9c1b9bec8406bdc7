"""``bms run`` (unbounded, on Prism) as a user runs it: in a terminal, stopped with Ctrl-C.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group. Prism, which bms starts,
must not get it (it would die in the middle of the drain bms asks of it), must not outlive bms
however bms ends, and must take jobs on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import prism, runners
from pipeline.errors import RuntimeFailure
from tests.conftest import missing, produce_into

START_TIMEOUT = 180  # seconds until the job has written rows (2 cores, shared)
DRAIN_TIMEOUT = 120


@pytest.fixture
def prism_binary() -> str:
    try:
        return runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))


@pytest.fixture
def job_args(tmp_path) -> list[str]:
    """``bms run`` over a hub holding the last 5 minutes of events: the job writes rows soon."""
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "600", "--rate", "2", "--seed", "41", "--simulate")
    return [
        "run",
        "--hub",
        str(hub),
        "--warehouse",
        f"sqlite:///{tmp_path / 'warehouse.db'}",
        "--checkpoints",
        str(tmp_path / "checkpoints"),
    ]


class Terminal:
    """``bms ARGS`` in a pseudo-terminal it owns, as a shell runs a foreground command: the
    session leader, its process group the terminal's foreground group."""

    def __init__(self, *args: str):
        self.master, slave = os.openpty()
        self.output = bytearray()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every end of the terminal's other side is closed
                return
            if not chunk:
                return
            self.output += chunk

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: the INTR character, which the kernel turns into
        SIGINT to the foreground process group."""
        assert os.tcgetpgrp(self.master) == self.process.pid, "bms is not in the foreground"
        os.write(self.master, termios.tcgetattr(self.master)[6][termios.VINTR])

    def wait(self, timeout: float) -> int:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"bms did not end within {timeout} s:\n{self.text()}")
        self._reader.join(5)
        return returncode

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.master)


def _take_terminal() -> None:
    """In the child, a new session's leader: the pty on fd 0 becomes its controlling terminal
    and its group the foreground group."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    os.tcsetpgrp(0, os.getpgrp())


def rows(warehouse_url: str) -> int:
    engine = sa.create_engine(warehouse_url)
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("SELECT COUNT(*) FROM bookings_fact").scalar()
    except sa.exc.DBAPIError:  # not created yet
        return 0
    finally:
        engine.dispose()


def wait_for_rows(process: subprocess.Popen, args: list[str], output) -> None:
    """Until the job has written rows: it reads, joins and writes."""
    warehouse = args[args.index("--warehouse") + 1]
    deadline = time.monotonic() + START_TIMEOUT
    while rows(warehouse) == 0:
        assert process.poll() is None, f"bms ended before writing a row:\n{output()}"
        assert time.monotonic() < deadline, f"no row within {START_TIMEOUT} s:\n{output()}"
        time.sleep(1)


def prism_children(pid: int, binary: str) -> list[int]:
    """The processes whose parent is ``pid`` and whose command is the Prism binary."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            if parent == pid and command == binary:
                found.append(int(entry.name))
    return found


def the_prism_of(pid: int, binary: str) -> int:
    deadline = time.monotonic() + 60
    while not (children := prism_children(pid, binary)):
        assert time.monotonic() < deadline, "bms started no Prism"
        time.sleep(0.2)
    assert len(children) == 1, children
    return children[0]


def alive(pid: int) -> bool:
    """A zombie (dead, not yet reaped by whoever inherited it) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_gone_soon(pid: int, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while alive(pid):
        assert time.monotonic() < deadline, f"Prism (pid {pid}) outlived bms by {seconds} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_drains_the_job_and_prints_the_summary(prism_binary, job_args):
    terminal = Terminal(*job_args)
    try:
        prism_pid = the_prism_of(terminal.process.pid, prism_binary)
        wait_for_rows(terminal.process, job_args, terminal.text)
        terminal.ctrl_c()
        returncode = terminal.wait(DRAIN_TIMEOUT)
    finally:
        terminal.close()
    output = terminal.text()
    assert returncode == 0, output
    assert "draining" in output and "events read:" in output, output
    assert "Traceback" not in output, output
    for chatter in ("Really starting service", "empty transform"):  # Beam's and Prism's logs
        assert chatter not in output, output
    assert_gone_soon(prism_pid)


@pytest.mark.slow
def test_a_second_ctrl_c_cancels_at_once(prism_binary, job_args):
    terminal = Terminal(*job_args)
    try:
        prism_pid = the_prism_of(terminal.process.pid, prism_binary)
        wait_for_rows(terminal.process, job_args, terminal.text)
        terminal.ctrl_c()
        deadline = time.monotonic() + 10
        while "draining" not in terminal.text():
            assert time.monotonic() < deadline, terminal.text()
            time.sleep(0.1)
        terminal.ctrl_c()
        returncode = terminal.wait(30)
    finally:
        terminal.close()
    assert returncode == 130, terminal.text()
    assert "Traceback" not in terminal.text(), terminal.text()
    assert_gone_soon(prism_pid)


def start_job(tmp_path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """bms in a session of its own (a signal for it reaches nobody else), its output logged."""
    log_path = tmp_path / "bms.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


@pytest.mark.slow
def test_prism_does_not_outlive_a_kill_9_of_bms_during_a_drain(tmp_path, prism_binary, job_args):
    process, log_path = start_job(tmp_path, job_args)
    try:
        prism_pid = the_prism_of(process.pid, prism_binary)
        wait_for_rows(process, job_args, log_path.read_text)
        process.send_signal(signal.SIGINT)  # a drain, then a crash in the middle of it
        time.sleep(1)
        process.kill()  # bms alone, not its group: Prism is not in it anyway
        process.wait()
        assert_gone_soon(prism_pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_prism_and_the_workers_listen_on_loopback_only(tmp_path, prism_binary, job_args):
    process, log_path = start_job(tmp_path, job_args)
    try:
        prism_pid = the_prism_of(process.pid, prism_binary)
        wait_for_rows(process, job_args, log_path.read_text)
        listening = {
            "Prism": prism.listening_addresses(prism_pid),
            "bms": prism.listening_addresses(process.pid),  # the LOOPBACK worker pool
        }
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=DRAIN_TIMEOUT) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert listening["Prism"] and listening["bms"], listening
    exposed = {
        name: [(address, port) for address, port in sockets if not prism.is_loopback(address)]
        for name, sockets in listening.items()
    }
    assert exposed == {"Prism": [], "bms": []}, listening
    assert "every network interface" not in log_path.read_text()
    assert_gone_soon(prism_pid)  # stopped by bms as it exits


@pytest.mark.parametrize("family, address", [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::1")])
def test_listening_addresses_are_read_from_proc(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((address, 0))
        server.listen()
        assert (address, server.getsockname()[1]) in prism.listening_addresses(os.getpid())
    assert prism.is_loopback("127.0.0.1") and prism.is_loopback("::ffff:127.0.0.1")
    assert not prism.is_loopback("0.0.0.0") and not prism.is_loopback("::")


@pytest.mark.parametrize(
    "ending", ["sys.exit(0)", "raise SystemExit(3)", "1 / 0", "os.kill(os.getpid(), 9)"]
)
def test_prism_ends_with_the_process_that_started_it(prism_binary, ending):
    """Stopped at exit; on kill -9 (no exit handler runs) killed by the kernel, even idle."""
    script = (
        "import os, sys\n"
        "from pipeline.prism import PrismServer\n"
        f"server = PrismServer({prism_binary!r})\n"
        "server.start()\n"
        "print(server.process.pid, flush=True)\n"
        f"{ending}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip().isdigit(), done.stderr
    if "kill" in ending:
        assert_gone_soon(int(done.stdout))
    else:
        assert not alive(int(done.stdout))  # stopped and reaped at exit: not even a zombie


def test_a_prism_that_cannot_start_is_one_line_naming_its_last_words(tmp_path):
    binary = tmp_path / "prism"
    binary.write_text("#!/bin/sh\necho 'panic: failed to listen: address in use' >&2\nexit 2\n")
    binary.chmod(0o755)
    with pytest.raises(RuntimeFailure) as failure:
        prism.PrismServer(str(binary)).start()
    assert str(failure.value) == (
        f"Prism ({binary}) exited at start with code 2: panic: failed to listen: address in use"
    )


def test_prisms_json_log_lines_keep_their_level_and_fields():
    parse = prism._parse_log_line
    line = '{"time":"2026-11-25T14:00:00Z","level":"WARN","msg":"empty transform","urn":"u"}'
    assert parse(line) == (logging.WARNING, "empty transform (urn='u')")
    assert parse('{"level":"ERROR+2","msg":"boom"}') == (logging.ERROR + 2, "boom")
    assert parse('{"level":"INFO","msg":"log from SDK worker","sdk":{"msg":"hi"}}') == (
        logging.INFO,
        "hi",
    )
    assert parse("panic: failed to listen") == (logging.INFO, "panic: failed to listen")
