"""The ``bms`` command line: strict flags with a did-you-mean, no abbreviations, Beam's options
passed through, one flag style, --version, -v/-q, defaults from the environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.io.warehouses import read_facts
from tests.conftest import produce_into


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--bouned"], "unknown option --bouned; did you mean --bounded?"),
        (["run", "--bounde"], "unknown option --bounde; did you mean --bounded?"),  # no prefixes
        (["run", "--windw-period", "5"], "did you mean --window-period?"),
        (["run", "--windw_period", "5"], "did you mean --window_period?"),
        (["run", "--runner=FnApiRunner", "--flink_mastr=x"], "did you mean --flink_master?"),
        (["produce", "--cont", "5"], "unknown option --cont; did you mean --count?"),
        (["parity", "--event"], "unknown option --event; did you mean --events?"),
    ],
)
def test_a_typo_is_an_error_with_a_suggestion_and_starts_nothing(argv, expected, capsys, tmp_path):
    hub = tmp_path / "hub.db"
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--hub", str(hub)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error
    assert not hub.exists()  # nothing ran


def test_beam_options_and_both_flag_spellings_are_accepted(tmp_path, capsys):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    produce_into(hub, "--count", "60", "--seed", "3", "--simulate", "2026-02-08T10:00:00Z")
    common = ["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse, "-q"]
    assert main([*common, "--runner=FnApiRunner", "--window-period", "60"]) == 0
    first = sorted(read_facts(warehouse))
    assert main([*common, "--window_period", "30", "--write_batch_size", "7"]) == 0
    assert sorted(read_facts(warehouse)) == first and first
    assert "0 newly written" in capsys.readouterr().out


def test_version_and_help_show_the_environment_defaults_without_passwords(monkeypatch, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0 and capsys.readouterr().out.startswith("bms ")
    monkeypatch.setenv("BMS_WAREHOUSE", "postgresql+psycopg://bms:s3cret@db.example/bms")
    monkeypatch.setenv("BMS_HUB", "/data/hub.db")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "postgresql+psycopg://bms:***@db.example/bms" in text and "s3cret" not in text
    assert "/data/hub.db; env BMS_HUB" in text
    assert "--window-period" in text and "--window_period" not in text


def test_the_environment_chooses_hub_and_warehouse(tmp_path, monkeypatch):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    produce_into(hub, "--count", "60", "--seed", "3", "--simulate", "2026-02-08T10:00:00Z")
    monkeypatch.setenv("BMS_HUB", str(hub))
    monkeypatch.setenv("BMS_WAREHOUSE", warehouse)
    assert main(["run", "--bounded", "-q"]) == 0
    assert read_facts(warehouse)


def test_a_hub_that_is_not_a_hub_is_named_in_one_line(tmp_path, capsys):
    not_a_hub = tmp_path / "hub.db"
    not_a_hub.write_text("this is not a database")
    warehouse = f"sqlite:///{tmp_path / 'w.db'}"
    assert main(["run", "--bounded", "--hub", str(not_a_hub), "--warehouse", warehouse]) == 3
    assert f"cannot read the hubs at {not_a_hub}" in one_line(capsys)


def test_an_unforeseen_failure_is_one_line_and_the_trace_comes_with_v(
    tmp_path, capsys, monkeypatch
):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "10", "--seed", "3", "--simulate", "2026-02-08T10:00:00Z")
    capsys.readouterr()

    def broken(*args, **kwargs):  # a bug nobody foresaw, deep inside a run
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("pipeline.pipeline.build", broken)
    run = ["run", "--bounded", "--hub", str(hub), "--warehouse", f"sqlite:///{tmp_path / 'w.db'}"]
    assert main(run) == 3
    error = one_line(capsys)
    assert "ZeroDivisionError: division by zero" in error and "-v" in error
    assert main([*run, "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err


# ---- checks at launch: one line each, with what to do ----


def launch(tmp_path, *args: str, hub=None, warehouse=None):
    hub = hub or tmp_path / "hub.db"
    warehouse = warehouse or f"sqlite:///{tmp_path / 'w.db'}"
    return main(["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse, *args])


@pytest.fixture
def hub(tmp_path):
    path = tmp_path / "hub.db"
    produce_into(path, "--count", "20", "--seed", "3", "--simulate", "2026-02-08T10:00:00Z")
    return path


def one_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_a_missing_hub_is_refused_and_not_created(tmp_path, capsys):
    missing_hub = tmp_path / "nowhere" / "hub.db"
    assert launch(tmp_path, hub=missing_hub) == 2
    assert f"no hub at {missing_hub}" in one_line(capsys) and not missing_hub.parent.exists()


def test_a_sqlite_warehouse_in_a_missing_folder_is_refused_and_not_created(tmp_path, hub, capsys):
    warehouse = f"sqlite:///{tmp_path / 'nonexistent' / 'dir' / 'x.db'}"
    assert launch(tmp_path, hub=hub, warehouse=warehouse) == 2
    assert "no folder" in one_line(capsys) and not (tmp_path / "nonexistent").exists()


def test_an_unknown_database_names_what_works(tmp_path, hub, capsys):
    assert launch(tmp_path, hub=hub, warehouse="postgres://nohost/db") == 2
    assert "bms writes to sqlite://, postgresql://" in one_line(capsys)


def test_a_missing_driver_names_the_extra_to_install(tmp_path, hub):
    # As on a machine without the postgres extra: psycopg cannot be imported.
    script = (
        "import sys; sys.modules['psycopg'] = None; from pipeline.cli import main; "
        f"sys.exit(main(['run', '--bounded', '--hub', {str(hub)!r}, "
        "'--warehouse', 'postgresql+psycopg://u:pw@nohost/db']))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install -e '.[postgres]'" in result.stderr and ":pw@" not in result.stderr


def test_a_read_only_warehouse_is_named(tmp_path, hub, capsys):
    path = tmp_path / "w.db"
    path.write_bytes(b"")
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"  # read-only even for root
    assert launch(tmp_path, hub=hub, warehouse=read_only) == 3
    error = one_line(capsys)
    assert str(path) in error and "readonly" in error


def test_a_truncated_checkpoint_file_is_named(tmp_path, capsys):
    hub = tmp_path / "hub.db"  # 500 s of events: more than the 2 minutes commits stay behind
    produce_into(hub, "--count", "200", "--seed", "3", "--simulate", "2026-02-08T10:00:00Z")
    checkpoints = tmp_path / "checkpoints"
    assert launch(tmp_path, "--checkpoints", str(checkpoints), hub=hub) == 0
    capsys.readouterr()
    files = sorted(checkpoints.rglob("*.json"))
    files[0].write_text('{"hub": "bookingt')
    assert launch(tmp_path, "--checkpoints", str(checkpoints), hub=hub) == 2
    error = one_line(capsys)
    assert f"checkpoint file {files[0]} is unreadable" in error


def test_unwritable_checkpoints_fail_at_launch(tmp_path, hub, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert launch(tmp_path, "--checkpoints", str(blocker / "checkpoints"), hub=hub) in (2, 3)
    assert "checkpoints" in one_line(capsys)


def test_the_run_summary_as_json_for_scripts(tmp_path, hub, capsys):
    assert launch(tmp_path, "--output", "json", "-q", hub=hub) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events_read"]["bookingtopic"] + summary["events_read"]["paymentstopic"] == 20
    assert summary["fact_rows"]["computed"] == summary["fact_rows"]["newly_written"]
    assert summary["warehouse"].startswith("sqlite:///")


def test_an_event_hubs_namespace_that_does_not_resolve_is_one_line(tmp_path, monkeypatch, capsys):
    # .invalid never resolves (RFC 6761): a DNS failure, as with a mistyped namespace.
    monkeypatch.setenv(
        "EVENTHUB_CONNECTION_STRING",
        "Endpoint=sb://bms-test.invalid/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0",
    )
    warehouse = f"sqlite:///{tmp_path / 'w.db'}"
    assert main(["run", "--bounded", "--hub", "eventhubs://", "--warehouse", warehouse]) == 3
    error = one_line(capsys)
    assert "cannot read the hubs at bms-test.invalid" in error and "c2VjcmV0" not in error
