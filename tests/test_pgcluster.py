"""The throwaway PostgreSQL cluster of ``tests/pgcluster.py``: it starts, serves SQLAlchemy over
psycopg, stops (clients then fail to connect), and starts again on the same port with its data."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.pgcluster import (
    PostgresNotInstalled,
    ThrowawayPostgres,
    missing,
    throwaway_postgres_fixture,
)

postgres = throwaway_postgres_fixture()


@pytest.fixture(autouse=True)
def _psycopg():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed; pip install -e '.[postgres]'")


def connect_timeout(cluster: ThrowawayPostgres) -> sa.Engine:
    # A stopped server refuses at once; the timeout only bounds a hung connect.
    return sa.create_engine(cluster.url, connect_args={"connect_timeout": 3}, poolclass=sa.NullPool)


def test_stop_and_start_again_keeps_the_data(postgres):
    began = time.monotonic()
    port = postgres.port
    engine = connect_timeout(postgres)
    with engine.begin() as connection:
        assert connection.scalar(sa.text("SELECT current_user")) == "bms"
        connection.execute(sa.text("CREATE TABLE probe (id int PRIMARY KEY, note text)"))
        connection.execute(sa.text("INSERT INTO probe VALUES (1, 'before the stop')"))

    postgres.stop()
    assert not postgres.running
    with pytest.raises(sa.exc.OperationalError):
        engine.connect().close()

    postgres.start()
    assert postgres.port == port and postgres.running
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT id, note FROM probe")).all()
    assert [tuple(row) for row in rows] == [(1, "before the stop")]
    assert time.monotonic() - began < 20


def test_immediate_stop_recovers_committed_rows(postgres):
    engine = connect_timeout(postgres)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE probe (id int PRIMARY KEY)"))
        connection.execute(sa.text("INSERT INTO probe VALUES (1), (2)"))
    open_transaction = engine.connect()
    open_transaction.execute(sa.text("INSERT INTO probe VALUES (3)"))  # never committed

    postgres.restart(mode="immediate")

    with pytest.raises(sa.exc.OperationalError):  # the old session died with the server
        open_transaction.execute(sa.text("SELECT 1"))
    open_transaction.invalidate()
    with engine.connect() as connection:
        assert connection.scalars(sa.text("SELECT id FROM probe ORDER BY id")).all() == [1, 2]


def test_password_is_checked_over_tcp(postgres):
    wrong = sa.make_url(postgres.url).set(password="wrong")
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        sa.create_engine(wrong, poolclass=sa.NullPool).connect().close()


def test_down_block_and_close_remove_everything():
    try:
        cluster = ThrowawayPostgres()
    except PostgresNotInstalled as error:
        missing(f"{error}; run scripts/setup-services")
    with cluster:
        assert cluster.odbc == (
            "Driver={PostgreSQL Unicode};Server=127.0.0.1;"
            f"Port={cluster.port};Database=bms;Uid=bms;Pwd=bms"
        )
        engine = connect_timeout(cluster)
        with cluster.down(), pytest.raises(sa.exc.OperationalError):
            engine.connect().close()
        with engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT 1")) == 1
        assert cluster.psql("SELECT datname FROM pg_database WHERE datname = 'bms'").strip() == (
            "bms"
        )
    assert not cluster.running
    assert not cluster.dir.exists()


def test_odbc_connection_string(postgres):
    try:
        import pyodbc
    except ImportError:
        missing("pyodbc is not installed; pip install -e '.[synapse]'")
    try:
        connection = pyodbc.connect(postgres.odbc, timeout=3, autocommit=True)
    except pyodbc.Error as error:
        missing(f"no PostgreSQL ODBC driver ({error.args[-1]}); run scripts/setup-services")
    with connection:
        connection.execute("CREATE TABLE probe (id int)")
        connection.execute("INSERT INTO probe VALUES (7)")
    with postgres.down(), pytest.raises(pyodbc.Error):
        pyodbc.connect(postgres.odbc, timeout=3)
    with pyodbc.connect(postgres.odbc, timeout=3) as connection:
        assert connection.execute("SELECT id FROM probe").fetchval() == 7
