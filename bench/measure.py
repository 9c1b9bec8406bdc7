"""Wall time, CPU-seconds and peak RSS of a command's whole process tree.

CPU: a process's CPU time reaches its parent's ``RUSAGE_CHILDREN`` only when the parent waits
for it, and an orphan (a runner that outlives the process that started it) is waited for by
init, not by whoever measures. So the measuring process makes itself a *child subreaper*
(Linux ``PR_SET_CHILD_SUBREAPER``): orphans of the tree are reparented to it, it waits for every
one of them, and the growth of its own ``RUSAGE_CHILDREN`` across one command is the CPU time
of that command's whole tree (the JVM of PyFlink, Prism, Beam's workers included), exactly, with
nothing lost between polls. Commands are measured one at a time, so nothing else is counted.

Memory: psutil sums the RSS of every live process of the tree every ``POLL_SECONDS``; the peak
of those sums is the tree's peak RSS (a page shared by two processes counts twice, as ``ps``
would show it; a spike shorter than a poll can be missed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_SECONDS = 0.2
#: How long the tree's last processes may take to exit once the command itself has ended.
STRAGGLER_SECONDS = 60.0
_PR_SET_CHILD_SUBREAPER = 36


class MeasureError(RuntimeError):
    """A measured command failed, ran out of time, or cannot be measured here."""


@dataclass(frozen=True)
class Usage:
    """What one command cost, from its start to the end of the last process of its tree."""

    wall_seconds: float
    cpu_seconds: float  # user + system, the whole tree
    peak_rss_bytes: int  # the largest sum of the tree's RSS seen
    returncode: int
    #: Seconds from the start until ``stop_when`` first held (then SIGINT went to the command).
    stopped_after: float | None = None
    #: Processes of the tree still running STRAGGLER_SECONDS after the command ended, then
    #: killed (their CPU time until then is counted).
    stragglers_killed: int = 0


def become_subreaper() -> None:
    """Makes this process the reaper of orphans among its descendants (Linux only)."""
    if not sys.platform.startswith("linux"):
        raise MeasureError("measuring a process tree's CPU needs Linux (PR_SET_CHILD_SUBREAPER)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise MeasureError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_rss(me: psutil.Process) -> int:
    total = 0
    for process in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or a zombie, since it was listed
            total += process.memory_info().rss
    return total


def _kill_tree(me: psutil.Process) -> int:
    """Kills every descendant and waits for them all; returns how many were alive."""
    alive = [process for process in me.children(recursive=True) if _running(process)]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    while children := me.children():  # killed grandchildren come to us as orphans
        psutil.wait_procs(children, timeout=1.0)
    return len(alive)


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def run_measured(
    command: Sequence[str],
    *,
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stop_when: Callable[[], bool] | None = None,
    check_every: float = 1.0,
    max_rss_bytes: int | None = None,
) -> Usage:
    """Runs ``command`` (output to ``log``) and measures its whole tree, until its last process
    has ended: the command's own, then whatever it left behind (given STRAGGLER_SECONDS, then
    killed). Waiting for each one (reparented orphans are our children) is what adds its CPU
    time to ours.

    With ``stop_when``, the command is a service: every ``check_every`` seconds ``stop_when()``
    is asked, and once it holds the command gets SIGINT (a terminal's Ctrl-C) and is left to end
    on its own. Past ``timeout`` seconds, or past ``max_rss_bytes`` of RSS (on a shared machine,
    before the kernel's OOM killer picks a victim that may be someone else's), the tree is killed
    and MeasureError raised; so it is if the command exits with an error."""
    become_subreaper()
    me = psutil.Process()
    if me.children():
        raise MeasureError("another child process is running: it would be measured too")
    cpu_before = _children_cpu()
    started = time.monotonic()
    stopped_after = command_ended = None
    stragglers = peak_rss = 0
    next_check = started + check_every
    with open(log, "wb") as output:
        process = subprocess.Popen(
            list(command), stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        while True:
            peak_rss = max(peak_rss, _tree_rss(me))
            now = time.monotonic()
            if process.poll() is not None:
                command_ended = command_ended or now
                _, alive = psutil.wait_procs(me.children(), timeout=0)  # reaps the ended
                if not alive:
                    break
                if now - command_ended > STRAGGLER_SECONDS:
                    stragglers = _kill_tree(me)
                    break
            if now - started > timeout:
                _kill_tree(me)
                raise MeasureError(f"ran past its {timeout:.0f} s limit (see {log})")
            if max_rss_bytes is not None and peak_rss > max_rss_bytes:
                _kill_tree(me)
                raise MeasureError(
                    f"killed after {now - started:.0f} s: its RSS reached "
                    f"{peak_rss / 2**30:.2f} GiB, over the {max_rss_bytes / 2**30:.2f} GiB limit"
                )
            if stop_when is not None and stopped_after is None and now >= next_check:
                next_check = now + check_every
                if process.returncode is None and stop_when():
                    stopped_after = now - started
                    process.send_signal(signal.SIGINT)
            time.sleep(POLL_SECONDS)
    usage = Usage(
        wall_seconds=time.monotonic() - started,
        cpu_seconds=_children_cpu() - cpu_before,
        peak_rss_bytes=peak_rss,
        returncode=process.returncode,
        stopped_after=stopped_after,
        stragglers_killed=stragglers,
    )
    if process.returncode != 0:
        raise MeasureError(
            f"{' '.join(map(str, command[:4]))} ... exited with {process.returncode}:\n" + tail(log)
        )
    return usage


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, to show with a failure."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
