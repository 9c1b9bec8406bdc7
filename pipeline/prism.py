"""Prism, Beam's local streaming runner, run the way a command in a terminal needs it.

Beam 2.77's ``PrismRunner`` starts the Prism binary itself (``SubprocessServer``) in bms's own
process group, so a Ctrl-C in a terminal, which the terminal sends to the whole foreground
group, kills Prism in the middle of the drain bms starts on it; nothing stops Prism when bms is
killed; it listens on every network interface; and its log ends up on bms's stderr.

``PrismRunner`` here is Beam's with its job-server hook (``default_job_server``) replaced:
``PrismServer`` starts the binary

- in a session of its own, so that no signal of the terminal reaches it: bms alone stops it,
  when bms exits (normally, on an error, on a second Ctrl-C), and on Linux the kernel kills it
  when bms dies (a parent-death signal, ``PR_SET_PDEATHSIG``), even on ``kill -9``;
- on 127.0.0.1. Beam 2.77's Prism has no flag for the address and listens on all interfaces;
  ``scripts/setup-runners prism`` builds it bound to 127.0.0.1. Prism's job port accepts jobs,
  and a job can run any command on this machine, so bms warns when its Prism listens on more
  than loopback;
- with its log on the logger ``apache_beam.prism``: Beam's side of the run, which ``bms -v``
  shows (errors only without it).

The runner's ``LOOPBACK`` worker pool (workers in bms's process: what lets Ctrl-C drain) is
bound to 127.0.0.1 too; Beam binds it to every interface, where anyone reaching it could start
a worker that runs their code in bms.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from apache_beam.options.pipeline_options import DebugOptions, PrismRunnerOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_fn_api_pb2_grpc, beam_job_api_pb2_grpc
from apache_beam.runners.portability import job_server
from apache_beam.runners.portability import prism_runner as beam_prism
from apache_beam.runners.worker import sdk_worker_main, worker_pool_main
from apache_beam.transforms import environments
from apache_beam.utils import thread_pool_executor

from pipeline import runners
from pipeline.errors import RuntimeFailure

HOST = "127.0.0.1"
START_TIMEOUT = 60  # seconds for Prism to answer on its port
STOP_TIMEOUT = 5  # seconds between SIGTERM and SIGKILL
_LOG = logging.getLogger("bms")
PRISM_LOG = logging.getLogger("apache_beam.prism")
_LEVELS = {  # Prism's (Go's slog) level names
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
}
# Beam's job-service channel options (SubprocessServer): no size limits, a long-lived stream.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_timeout_ms", 600_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", True),
    ("grpc.http2.max_ping_strikes", 0),
]


class PrismRunner(beam_prism.PrismRunner):
    """Beam's PrismRunner on a ``PrismServer`` and a worker pool bound to 127.0.0.1.

    ``--job_endpoint`` still points it at a Prism started elsewhere, as with Beam's."""

    def default_job_server(self, options):
        prism = options.view_as(PrismRunnerOptions)
        return PrismServer.shared(prism.prism_location or runners.prism_binary(), prism)

    @staticmethod
    def start_and_replace_loopback_environments(pipeline, options):
        """Beam's, with the worker pool bound to 127.0.0.1 (Beam's binds ``[::]``)."""
        if options.view_as(DebugOptions).lookup_experiment("use_loopback_process_worker"):
            return beam_prism.PrismRunner.start_and_replace_loopback_environments(pipeline, options)
        cleanups = []
        for environment in pipeline.components.environments.values():
            if environment.urn == python_urns.EMBEDDED_PYTHON_LOOPBACK:
                address, server = _start_worker_pool(options)
                external = environments.ExternalEnvironment(address).to_runner_api(None)
                environment.urn, environment.payload = external.urn, external.payload
                cleanups.append(functools.partial(server.stop, 1))
        return cleanups


def _start_worker_pool(options) -> tuple[str, grpc.Server]:
    """Beam's ``BeamFnExternalWorkerPoolServicer.start`` (workers as threads of this process),
    listening on 127.0.0.1 only."""
    experiments = options.view_as(DebugOptions).experiments or []
    server = grpc.server(
        thread_pool_executor.shared_unbounded_instance(),
        options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)],
    )
    port = server.add_insecure_port(f"{HOST}:0")
    pool = worker_pool_main.BeamFnExternalWorkerPoolServicer(
        state_cache_size=sdk_worker_main._get_state_cache_size_bytes(options=options),
        data_buffer_time_limit_ms=sdk_worker_main._get_data_buffer_time_limit_ms(experiments),
    )
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    return f"{HOST}:{port}", server


class PrismServer(job_server.JobServer):
    """One Prism process: started by ``start`` (a Beam job service stub to it), stopped by
    ``stop`` or at the latest when this process exits."""

    _shared: dict[tuple[str, str], PrismServer] = {}
    _shared_lock = threading.Lock()

    def __init__(self, binary: str, log_level: str = "info"):
        self.binary = binary
        self.log_level = log_level
        self.process: subprocess.Popen | None = None
        self.endpoint: str | None = None
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._last_line = ""
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, binary: str, options: PrismRunnerOptions | None = None) -> PrismServer:
        """The server of this binary that later jobs in this process reuse (as Beam's
        PrismRunner does), until it stops."""
        level = options.prism_log_level if options is not None else "info"
        with cls._shared_lock:
            return cls._shared.setdefault((binary, level), cls(binary, level))

    def start(self) -> beam_job_api_pb2_grpc.JobServiceStub:
        """Starts Prism, or again if it stopped or died; a stub of its job service."""
        with self._lock:
            if self.process is not None and self.process.poll() is not None:
                self.stop()
            if self._stub is None:
                self._start()
            return self._stub

    def _start(self) -> None:
        if not Path(self.binary).is_file():
            raise RuntimeFailure(
                f"no Prism binary at {self.binary}: run scripts/setup-runners prism"
            )
        atexit.register(self._stop_at_exit)
        for attempt in range(3):  # the free port picked may be taken before Prism binds it
            port = _free_port()
            self.process = _launch(self._command(port))
            self._reader = threading.Thread(
                target=self._forward_log, args=(self.process,), name="prism-log", daemon=True
            )
            self._reader.start()
            if self._wait_until_ready(port):
                break
            if attempt == 2:
                raise RuntimeFailure(
                    f"Prism ({self.binary}) exited at start with code "
                    f"{self.process.returncode}: {self.last_words()}"
                )
        self.endpoint = f"{HOST}:{port}"
        self._channel = grpc.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
        self._stub = beam_job_api_pb2_grpc.JobServiceStub(self._channel)
        _warn_if_exposed(self.process.pid, port)

    def _command(self, port: int) -> list[str]:
        return [
            self.binary,
            f"--job_port={port}",
            "--serve_http=false",
            "--log_kind=json",
            f"--log_level={self._prism_log_level()}",
        ]

    def _prism_log_level(self) -> str:
        """The user's Prism log level, raised to what bms's logging shows: Prism formats no
        line that nobody would see."""
        wanted = _LEVELS.get(self.log_level.upper(), logging.INFO)
        shown = min(
            (level for level in _LEVELS.values() if PRISM_LOG.isEnabledFor(level)),
            default=logging.ERROR,
        )
        level = max(wanted, shown)
        return {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn"}.get(
            level, "error"
        )

    def _wait_until_ready(self, port: int) -> bool:
        """True once Prism listens on its port; False if it exited first."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeFailure(
                    f"Prism ({self.binary}) did not listen on {HOST}:{port} within "
                    f"{START_TIMEOUT} s: {self.last_words()}"
                )
            time.sleep(0.1)
        return False

    def _forward_log(self, process: subprocess.Popen) -> None:
        """Prism's JSON log lines, by level, to ``PRISM_LOG``; the last one kept for errors."""
        for raw in process.stdout:
            level, message = _parse_log_line(raw.decode(errors="backslashreplace").rstrip())
            if message:
                self._last_line = message
                PRISM_LOG.log(level, "%s", message)

    def last_words(self) -> str:
        """Prism's last log line (its error when it failed to start)."""
        if self._reader is not None:  # it may still be reading what Prism wrote as it exited
            self._reader.join(timeout=2)
        return self._last_line or "(nothing in its log)"

    def _stop_at_exit(self) -> None:
        """``stop`` as bms exits. The job is over (done, failed or cancelled), but after a
        cancel bms's LOOPBACK workers may still hold streams to Prism: each would print a
        stack trace as they break. Those are muted, unless bms -v."""
        if not PRISM_LOG.isEnabledFor(logging.INFO):
            logging.getLogger("apache_beam.runners.worker").setLevel(logging.CRITICAL)
            threading.excepthook = lambda args: None
        self.stop()

    def stop(self) -> None:
        """Stops Prism: SIGTERM, then SIGKILL if it is still there after ``STOP_TIMEOUT``."""
        with contextlib.suppress(Exception):
            atexit.unregister(self._stop_at_exit)
        process, self.process = self.process, None
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _launch(command: list[str]) -> subprocess.Popen:
    """Prism in a session of its own (no terminal signal reaches it), dying with this process
    (Linux), its output to a pipe."""
    if sys.platform == "linux":
        command = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# Run before Prism, in the process that becomes Prism: asks the kernel for SIGKILL when its
# parent (bms's thread that started it: bms's main thread) ends, however it ends, then execs
# Prism, which keeps that request. A ``preexec_fn`` would do the same, but it makes Python
# fork (not vfork) bms, whose gRPC threads then print a warning on the terminal.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
prctl = ctypes.CDLL(None, use_errno=True).prctl
if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(sys.argv[1]):
    sys.exit("bms ended before Prism started")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _parse_log_line(line: str) -> tuple[int, str]:
    """(level, text) of one of Prism's ``--log_kind=json`` lines; other lines as they are."""
    try:
        record = json.loads(line)
        base, offset = re.fullmatch(r"([A-Z]+)([+-]\d+)?", record.pop("level")).groups()
        message = str(record.pop("msg"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return logging.INFO, line
    level = _LEVELS.get(base, logging.INFO) + int(offset or 0)
    for key in ("time", "source"):
        record.pop(key, None)
    if message == "log from SDK worker" and isinstance(record.get("sdk"), dict):
        message = str(record["sdk"].get("msg", message))
    elif record:
        message += " (" + ", ".join(f"{key}={value!r}" for key, value in record.items()) + ")"
    return level, message


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (Linux: /proc)."""
    inodes = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    address, port = local.split(":")
                    found.append((_proc_address(address), int(port, 16)))
    return found


def _proc_address(hexed: str) -> str:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = b"".join(int(hexed[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(hexed), 8))
    return str(ipaddress.ip_address(raw))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _warn_if_exposed(pid: int, port: int) -> None:
    if sys.platform != "linux":
        return
    try:
        exposed = [a for a, p in listening_addresses(pid) if p == port and not is_loopback(a)]
    except OSError:
        return
    if exposed:
        _LOG.warning(
            "Prism listens for jobs on every network interface (%s port %d), where anyone "
            "reaching this machine could run a job: rebuild it bound to 127.0.0.1 with "
            "scripts/setup-runners prism",
            exposed[0],
            port,
        )
