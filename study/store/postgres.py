"""PostgreSQL: a server several machines share; bulk inserts by COPY, id lists as arrays."""

from __future__ import annotations

from enum import Enum

import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql

from study.errors import StorageError
from study.store.base import causes
from study.store.rdb import RDBStore, _utc
from study.store.url import StorageURL, redact

PG_CONNECT_TIMEOUT_S = 5  # an unreachable server is reported after this, not a hang
# libpq's words for a server that is down or restarting, which a run waits out at its start
# ([study] storage_outage); a host that does not resolve, a database or role that does not
# exist, a password refused: reported at once.
_DOWN = (
    "Connection refused",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "server closed the connection unexpectedly",
    "timeout expired",
)


class Unreachable(StorageError):
    """The server is down or restarting (`_DOWN`): worth waiting for."""


class PostgresStore(RDBStore):
    kind = "postgresql"

    @classmethod
    def check(cls, parsed: StorageURL, read_only: bool = False) -> None:
        """The server answers and the database exists."""
        url = parsed.url
        try:
            import psycopg
        except ImportError:
            raise StorageError(
                "PostgreSQL storage needs psycopg; run: pip install 'sinstudy[postgres]'",
                exit_code=1,
            ) from None
        dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            psycopg.connect(dsn, connect_timeout=PG_CONNECT_TIMEOUT_S).close()
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            line = (
                f"cannot connect to PostgreSQL at {redact(dsn)!r} ({first}); start the server, "
                "create the database, or fix --storage"
            )
            down = any(why in str(e) for why in _DOWN)
            raise (Unreachable if down else StorageError)(line, exit_code=1) from None

    def fault(self, exc: BaseException) -> str | None:
        """The server's full disk, or a connection lost or refused (the server stopped,
        restarting, or out of reach), named with its host."""
        import psycopg

        server = "the PostgreSQL server"
        if self.url is not None:
            u = sqlalchemy.engine.make_url(self.url.url)
            server += f" at {u.host or 'localhost'}:{u.port or 5432}"
        for e in causes(exc):
            if not isinstance(e, psycopg.Error):
                continue
            state = e.sqlstate or ""
            if state == "53100":
                return f"{server} is out of disk space; free space on the server"
            lost = state.startswith("08") or state in ("57P01", "57P02", "57P03")
            if lost or (isinstance(e, psycopg.OperationalError) and not state):
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                return f"{server} cannot be reached ({first}); start it or fix --storage"
        return super().fault(exc)

    @classmethod
    def _engine(cls, parsed: StorageURL, *, read_only: bool) -> tuple[str, dict]:
        connect: dict = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        if read_only:
            connect["options"] = "-c default_transaction_read_only=on"
        return parsed.url, {"pool_pre_ping": True, "connect_args": connect}

    def _lock_for_check(self, session) -> None:
        """The study row's FOR UPDATE that follows does it."""

    def _one_of(self, column, ids: list[int]):
        """`column = ANY(:ids)`, one array parameter: an IN list of a thousand ids is a thousand
        bind parameters, which SQLAlchemy renders and psycopg parses on every call, at more
        cost than the query."""
        return column == sqlalchemy.any_(_id_array(ids))

    def _rows(self, session, query) -> list[tuple]:
        """psycopg's own tuples: it returns every column read here (ints, floats, text,
        timestamps) as SQLAlchemy would."""
        return session.connection().execute(query).cursor.fetchall()

    def _put(self, session, model, rows: list[dict]) -> None:
        """One COPY in the session's transaction: an executemany is one statement per row, whose
        parameters psycopg adapts one by one, and the writer stores thousands of rows a second.
        Enum values go as their names, which is how SQLAlchemy stores Optuna's enums."""
        if not rows:
            return
        cols = list(rows[0])
        raw = session.connection().connection.driver_connection
        copy_sql = f"COPY {model.__table__.name} ({', '.join(cols)}) FROM STDIN"
        with raw.cursor() as cur, cur.copy(copy_sql) as copy:
            for r in rows:
                copy.write_row([v.name if isinstance(v, Enum) else v for v in map(r.get, cols)])

    def _new_trial_ids(
        self, session, study_id: int, trials: list[FrozenTrial]
    ) -> list[tuple[int, int]]:
        """The rows in one COPY, their ids taken from the table's sequence first and their
        numbers counted before (the study row is locked, as Optuna locks it to number a trial,
        and every trial of the study has a lower id than the sequence's next)."""
        seq = sqlalchemy.func.pg_get_serial_sequence("trials", "trial_id")
        ids = sorted(
            session.execute(
                sqlalchemy.select(sqlalchemy.func.nextval(seq)).select_from(
                    sqlalchemy.func.generate_series(1, len(trials))
                )
            ).scalars()
        )
        m = models.TrialModel
        first = session.execute(
            sqlalchemy.select(sqlalchemy.func.count(m.trial_id)).where(m.study_id == study_id)
        ).scalar()
        self._put(
            session,
            m,
            [
                dict(
                    trial_id=tid,
                    number=first + i,
                    study_id=study_id,
                    state=t.state,
                    datetime_start=_utc(t.datetime_start),
                    datetime_complete=_utc(t.datetime_complete),
                )
                for i, (tid, t) in enumerate(zip(ids, trials, strict=True))
            ],
        )
        return [(tid, first + i) for i, tid in enumerate(ids)]

    def _insert_heartbeats(self, session, ids: list[int]) -> None:
        beats = models.TrialHeartbeatModel.__table__
        session.execute(
            insert(beats).from_select(
                ["trial_id", "heartbeat"],
                sqlalchemy.select(sqlalchemy.func.unnest(_id_array(ids)), sqlalchemy.func.now()),
            )
        )


def _id_array(ids: list[int]):
    return sqlalchemy.bindparam(None, ids, type_=postgresql.ARRAY(sqlalchemy.Integer))
