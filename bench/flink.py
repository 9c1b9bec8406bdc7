"""PyFlink in a virtual environment of its own, made once under the bms cache.

    python -m bench.flink [--flink-version 2.3.0]     # make it now (scripts/setup-runners pyflink)

apache-flink pins an older apache-beam (2.3.0: apache-beam 2.61) than the project's 2.77, so it
can never share the project's environment: the benchmark runs Flink jobs with this
environment's Python. The environment lives in ``$BMS_CACHE/bench/pyflink-VERSION`` (default
``~/.cache/bms``), and is marked complete only once pip has finished, so a half-made one is made
again, never used. Flink needs Java (11 or newer; 17 here).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.runners import cache_dir

#: The newest apache-flink on PyPI with a wheel for this Python (3.11), checked 2026-11-25.
FLINK_VERSION = "2.3.0"
MIN_JAVA = 11
#: Written last: an environment without it is half made and is made again.
COMPLETE = "bms-complete"


class FlinkUnavailable(RuntimeError):
    """PyFlink cannot run here: no Java, or its environment could not be made."""


def java_version() -> str:
    """The installed Java's version (``17.0.15``); FlinkUnavailable if there is none or it is
    older than MIN_JAVA."""
    java = shutil.which("java")
    if java is None:
        raise FlinkUnavailable(
            f"PyFlink needs Java {MIN_JAVA}+ and there is no java on PATH (Debian: apt-get "
            "install openjdk-17-jre-headless; scripts/setup-runners pyflink does it)"
        )
    output = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?[^"]*"', output)
    if match is None:
        raise FlinkUnavailable(f"cannot read the Java version from: {output.strip()[:200]}")
    major = int(match.group(1))
    if major == 1:  # 1.8 is Java 8
        major = int(match.group(2) or 0)
    if major < MIN_JAVA:
        raise FlinkUnavailable(f"PyFlink needs Java {MIN_JAVA}+, found {match.group(0)}")
    return match.group(0).split('"')[1]


def environment(version: str = FLINK_VERSION) -> Path:
    """The folder of the PyFlink environment for ``version``."""
    return cache_dir() / "bench" / f"pyflink-{version}"


def flink_python(version: str = FLINK_VERSION, log=sys.stderr) -> Path:
    """The Python of the PyFlink environment, made first if missing (about 30 s to minutes:
    apache-flink and its dependencies, some 850 MB, come from PyPI)."""
    java_version()
    folder = environment(version)
    python, complete = folder / "bin" / "python", folder / COMPLETE
    if complete.exists():
        return python
    shutil.rmtree(folder, ignore_errors=True)  # a half-made one, from an interrupted run
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"making the PyFlink {version} environment in {folder} (once) ...", file=log)
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"apache-flink=={version}"],
            check=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise FlinkUnavailable(
            f"could not make the PyFlink {version} environment: {error}"
        ) from None
    complete.write_text(f"apache-flink=={version}\n")
    print(f"PyFlink {version} ready in {time.monotonic() - started:.0f} s", file=log)
    return python


def installed_version(python: Path) -> str:
    """apache-flink's version in the environment, as pip installed it."""
    query = "from importlib.metadata import version; print(version('apache-flink'))"
    result = subprocess.run([str(python), "-c", query], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flink-version", default=FLINK_VERSION)
    args = parser.parse_args()
    try:
        python = flink_python(args.flink_version)
        print(f"PyFlink {installed_version(python)} on Java {java_version()}: {python}")
    except FlinkUnavailable as error:
        sys.exit(f"bench.flink: {error}")


if __name__ == "__main__":
    main()
