"""Store — each study round's outcome, each delivery, each dead letter and each reviewer's verdict are rows
in a small SQL store (no patient names, ids or birth dates). SQLite by default; any SQLAlchemy URL (e.g.
PostgreSQL) works. The worker writes it (worker/record.py); the worklist reads it; the reconciliation
(worker/reconcile.py) compares it with the rounds the node queued."""

import contextlib
import fcntl
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import cast

from sqlalchemy import (
    JSON,
    CursorResult,
    DateTime,
    Enum,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    Update,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from common.results import FINAL_STATUSES, DeliveryStatus, Finding, ImageResult, StudyStatus, Verdict

log = logging.getLogger("lungvision.store")


def enum_column(kind: type[StrEnum]) -> Enum:
    """A VARCHAR(16) column holding ``kind``'s values (the plain strings earlier versions stored)."""
    return Enum(
        kind,
        native_enum=False,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class ImageResults(TypeDecorator):
    """A JSON list of :class:`ImageResult` (an ImageResult or its dict may be given)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return [ImageResult.model_validate(image).model_dump(mode="json") for image in value]

    def process_result_value(self, value, dialect):
        return None if value is None else [ImageResult.model_validate(image) for image in value]


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class StudyResult(Base):
    """One analysed study round: what the model found and what was produced."""

    __tablename__ = "study_results"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[StudyStatus] = mapped_column(enum_column(StudyStatus))
    finding: Mapped[Finding] = mapped_column(enum_column(Finding))
    probability: Mapped[float | None] = mapped_column(Float)  # study level: the highest image probability
    threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    images: Mapped[list[ImageResult]] = mapped_column(ImageResults())
    timings_ms: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    analysed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Delivery(Base):
    """The state of sending one study round's outputs to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(enum_column(DeliveryStatus))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# One row per round and destination: the worker (recording the round) and the deliverer (recording the
# delivery, when it was faster) may both insert it at once; the loser updates the winner's row.
ONE_DELIVERY_PER_DESTINATION = Index(
    "deliveries_one_per_destination", Delivery.message_id, Delivery.destination, unique=True
)


class DeadLetterRow(Base):
    """A delivery that used up its attempts, or an analysis that failed (``lungvision jobs failed``).
    Kept here, never in the broker, so that a broker losing its data cannot erase them."""

    __tablename__ = "dead_letters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    record: Mapped[str] = mapped_column(Text)


class RoundAttempt(Base):
    """How often a queued study round was started and re-sent — what tells a round being analysed right
    now from one whose worker died or whose message the broker lost (see worker/reconcile.py)."""

    __tablename__ = "round_attempts"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # analysis starts, a start after a crash included
    owner: Mapped[str | None] = mapped_column(String(128))  # "host/pid-namespace/pid" of the latest start
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # the latest start
    requeues: Mapped[int] = mapped_column(Integer, default=0)  # times its message was sent again
    requeued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # the latest re-send


@dataclass(frozen=True)
class RoundState:
    """One round as the store knows it: its status (None = no outcome yet) and its attempt record.
    Times are POSIX seconds; ``attempts`` and ``requeues`` also version the record for the
    conditional updates that keep two processes from claiming or re-sending a round twice."""

    status: StudyStatus | None = None
    attempts: int = 0
    owner: str | None = None
    started_at: float | None = None
    requeues: int = 0
    requeued_at: float | None = None


class Review(Base):
    """The current verdict of a reviewer on one study round's finding (one row per round)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[Verdict] = mapped_column(enum_column(Verdict))
    reviewer: Mapped[str] = mapped_column(String(64))  # the web sign-in user name
    finding: Mapped[Finding] = mapped_column(enum_column(Finding))  # the round's finding when it was reviewed
    model_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


SQLITE_BUSY_TIMEOUT_S = 30  # a SQLite writer waits this long for another process's write (pysqlite: 5 s)
SCHEMA_TRIES = 3
_IN_CHUNK = 500  # message ids per "IN (...)" query


def create_schema(engine: Engine) -> None:
    """Create the missing tables. Two processes doing it at once on a fresh database collide (e.g. "table
    study_results already exists"); the loser tries again and then finds the tables there. On a SQLite
    file they take turns instead (``_one_at_a_time``). The worker creates them once before it forks its
    pool (worker/commands.py), so its processes do not race; node, web and worker starting together still may."""
    with _one_at_a_time(engine):
        for attempt in range(1, SCHEMA_TRIES + 1):
            try:
                Base.metadata.create_all(engine)
                _add_one_delivery_per_destination(engine)
                return
            except DatabaseError as error:
                if attempt == SCHEMA_TRIES:
                    raise
                log.warning(
                    "creating the store's tables collided with another process (%s); trying again",
                    type(error).__name__,
                )


@contextlib.contextmanager
def _one_at_a_time(engine: Engine) -> Iterator[None]:
    """For a SQLite file store: hold an exclusive ``flock`` on ``<file>.schema-lock`` beside it (not on the
    database file: closing another descriptor of it would drop SQLite's own locks). pysqlite runs each
    CREATE TABLE in a transaction of its own, so processes creating the tables together kept colliding
    table after table (three times in a row for a worker started with node and deliverer: it exited);
    taking turns, the later ones find the tables there. Other databases: nothing (their DDL is transactional)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.schema-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


DELIVERY_PROGRESS = {  # which of two rows for one delivery says more (stores before the unique index)
    DeliveryStatus.PENDING: 0,
    DeliveryStatus.RETRYING: 1,
    DeliveryStatus.DELIVERED: 2,
    DeliveryStatus.FAILED: 2,
}


def _add_one_delivery_per_destination(engine: Engine) -> None:
    """Give a store of an earlier version the unique index :data:`ONE_DELIVERY_PER_DESTINATION`. Without it,
    the worker and the deliverer could each insert a row for the same delivery ("pending" and "delivered"),
    and the round stayed "analysed" for ever: of such rows the one that says more stays (the latest of
    equals), and the round's status is rolled up again."""
    if any(index["name"] == ONE_DELIVERY_PER_DESTINATION.name for index in inspect(engine).get_indexes("deliveries")):
        return
    with Session(engine) as session, session.begin():
        doubled = session.execute(
            select(Delivery.message_id, Delivery.destination)
            .group_by(Delivery.message_id, Delivery.destination)
            .having(func.count() > 1)
        ).all()
        for message_id, destination in doubled:
            rows = session.scalars(
                select(Delivery).where(Delivery.message_id == message_id, Delivery.destination == destination)
            ).all()
            kept = max(rows, key=lambda row: (DELIVERY_PROGRESS[row.status], row.id))
            session.execute(delete(Delivery).where(Delivery.id.in_([row.id for row in rows if row is not kept])))
            _roll_up(session, message_id)
    if doubled:
        log.warning("the store held %d deliveries twice (an earlier version); merged", len(doubled))
    ONE_DELIVERY_PER_DESTINATION.create(engine)


def _posix(moment: datetime | None) -> float | None:
    """POSIX seconds of a stored time (SQLite gives times back without their UTC zone)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _write_ahead_log(connection, _record) -> None:
    """A SQLite file store journals in write-ahead-log mode (kept in the file; a no-op once set).

    A commit is then one append and one fsync of the ``-wal`` file (``synchronous`` stays FULL: a
    committed outcome survives a crash and a power cut) instead of a rollback journal written, synced
    and deleted, and the database file synced, each time: 1.5 → 0.3 ms a commit on the test VM, and
    every study takes three or four (claim, outcome, deliveries; issue 12). Readers (the worklist)
    no longer wait for a writer's commit either. Node, worker and web must share one host's file
    system, as SQLite's locking already required (not a network share)."""
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


class Store:
    """The outcome store; creates its tables on first use."""

    def __init__(self, url: str) -> None:
        is_sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S} if is_sqlite else {})
        database = self.engine.url.database
        if is_sqlite and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _write_ahead_log)
        create_schema(self.engine)

    def save_result(self, result: StudyResult) -> None:
        """Insert or replace the row of ``result.message_id``."""
        with Session(self.engine) as session, session.begin():
            session.merge(result)

    def result(self, message_id: str) -> StudyResult | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(StudyResult, message_id)

    def results(self) -> list[StudyResult]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(StudyResult).order_by(StudyResult.analysed_at)))

    def study_results(self, study_instance_uid: str) -> list[StudyResult]:
        """Every round of one study, oldest first."""
        with Session(self.engine, expire_on_commit=False) as session:
            return list(
                session.scalars(
                    select(StudyResult)
                    .where(StudyResult.study_instance_uid == study_instance_uid)
                    .order_by(StudyResult.round, StudyResult.analysed_at)
                )
            )

    def update_delivery(
        self, message_id: str, destination: str, *, status: DeliveryStatus, attempts: int, error: str | None = None
    ) -> None:
        """Record the latest state of one delivery, and roll the study's status up from all of them."""
        state = {"status": status, "attempts": attempts, "last_error": (error or None) and error[:512]}

        def write(session: Session) -> None:
            # Lock the round's row first, as save_outcome does by writing it: two transactions that lock in
            # one order cannot deadlock (PostgreSQL; SQLite locks the whole file at the first write). The
            # roll-up below then finds the row in the session.
            session.get(StudyResult, message_id, with_for_update=True)
            # then update before inserting: a row read before this transaction wrote may already be stale
            this_delivery = (Delivery.message_id == message_id, Delivery.destination == destination)
            if not _changed(session, update(Delivery).where(*this_delivery).values(**state)):
                session.add(Delivery(message_id=message_id, destination=destination, **state))
                session.flush()
            _roll_up(session, message_id)

        self._write(write)

    def save_outcome(self, result: StudyResult, destinations: list[str]) -> None:
        """Record an analysed round and a pending delivery per destination, together (a crash between
        the two would leave deliveries nobody reconciles). A delivery whose task already ran (it was
        queued before this was written) keeps its state, and the round's status rolls up from it."""

        def write(session: Session) -> None:
            session.merge(result)
            known = set(session.scalars(select(Delivery.destination).where(Delivery.message_id == result.message_id)))
            for name in destinations:
                if name not in known:
                    session.add(
                        Delivery(
                            message_id=result.message_id, destination=name, status=DeliveryStatus.PENDING, attempts=0
                        )
                    )
            session.flush()
            _roll_up(session, result.message_id)

        self._write(write)

    def _write(self, change: Callable[[Session], None]) -> None:
        """Run ``change`` in a transaction, and once more if another process inserted the same delivery row
        meanwhile (IntegrityError of :data:`ONE_DELIVERY_PER_DESTINATION`): the second run finds that row."""
        try:
            with Session(self.engine) as session, session.begin():
                change(session)
        except IntegrityError:
            log.info("another process recorded the same delivery at the same moment; recording again")
            with Session(self.engine) as session, session.begin():
                change(session)

    def deliveries(self, message_id: str) -> list[Delivery]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Delivery).where(Delivery.message_id == message_id)))

    def put_dead_letter(self, letter_id: str, record: str) -> None:
        """Insert (or replace) one dead letter."""
        with Session(self.engine) as session, session.begin():
            session.merge(DeadLetterRow(id=letter_id, record=record))

    def dead_letters(self) -> list[str]:
        with Session(self.engine) as session:
            return [row.record for row in session.scalars(select(DeadLetterRow))]

    def take_dead_letter(self, letter_id: str) -> str | None:
        with Session(self.engine) as session, session.begin():
            row = session.get(DeadLetterRow, letter_id)
            if row is None:
                return None
            session.delete(row)
            return row.record

    # --- reconciliation: claims, failures, re-sends (decisions in worker/reconcile.py) ------------

    def round_states(self, message_ids: Iterable[str]) -> dict[str, RoundState]:
        """The state of each round in ``message_ids`` (a round the store never heard of: ``RoundState()``)."""
        ids = list(dict.fromkeys(message_ids))
        statuses: dict[str, StudyStatus] = {}
        attempts: dict[str, RoundAttempt] = {}
        with Session(self.engine) as session:
            for chunk in _chunks(ids):
                rows = session.execute(
                    select(StudyResult.message_id, StudyResult.status).where(StudyResult.message_id.in_(chunk))
                )
                statuses.update((message_id, status) for message_id, status in rows)
                attempts.update(
                    (row.message_id, row)
                    for row in session.scalars(select(RoundAttempt).where(RoundAttempt.message_id.in_(chunk)))
                )
            return {message_id: _state(statuses.get(message_id), attempts.get(message_id)) for message_id in ids}

    def round_state(self, message_id: str) -> RoundState:
        return self.round_states([message_id])[message_id]

    def track(self, message_id: str) -> None:
        """Give the round an attempt row if it has none (the conditional updates below need one)."""
        try:
            with Session(self.engine) as session, session.begin():
                if session.get(RoundAttempt, message_id) is None:
                    session.add(RoundAttempt(message_id=message_id, attempts=0, requeues=0))
        except IntegrityError:
            log.debug("attempt row of %s was created by another process at the same moment", message_id)

    def start_attempt(self, placeholder: StudyResult, owner: str, now: datetime, seen: RoundState) -> bool:
        """Record that ``owner`` starts analysing the round now, and show it as analysing (``placeholder``),
        in one transaction. False, and nothing written, when another process started it since ``seen`` was
        read (or gave the round its attempt row at the same moment)."""
        try:
            with Session(self.engine) as session, session.begin():
                claimed = _count_start(session, placeholder.message_id, owner, now, seen)
                if claimed:
                    session.merge(placeholder)
        except IntegrityError:
            log.debug("attempt row of %s was created by another process at the same moment", placeholder.message_id)
            return False
        return claimed

    def record_failure(self, failed: StudyResult, letter_id: str, letter_record: str) -> bool:
        """Record a failed analysis and its dead letter together. False, and nothing written, when the
        round already has a final outcome (another attempt finished it)."""
        with Session(self.engine) as session, session.begin():
            existing = session.get(StudyResult, failed.message_id)
            if existing is not None and existing.status in FINAL_STATUSES:
                return False
            session.merge(failed)
            session.merge(DeadLetterRow(id=letter_id, record=letter_record))
        return True

    def mark_requeued(self, message_id: str, now: datetime, seen: RoundState) -> bool:
        """Note that the round's message is being sent again. False, and nothing written, when another
        process started or re-sent the round since ``seen`` was read (it must not be sent twice)."""
        self.track(message_id)
        with Session(self.engine) as session, session.begin():
            return (
                _changed(
                    session,
                    update(RoundAttempt)
                    .where(
                        RoundAttempt.message_id == message_id,
                        RoundAttempt.attempts == seen.attempts,
                        RoundAttempt.requeues == seen.requeues,
                    )
                    .values(requeues=seen.requeues + 1, requeued_at=now),
                )
                == 1
            )

    def mark_replayed(self, message_id: str, now: datetime) -> None:
        """An operator replays the round's failed analysis: show it as requeued, with a fresh set of attempts."""
        with Session(self.engine) as session, session.begin():
            result = session.get(StudyResult, message_id)
            if result is not None:
                result.status, result.finding = StudyStatus.REQUEUED, Finding.PENDING
            attempt = session.get(RoundAttempt, message_id)
            if attempt is None:
                attempt = RoundAttempt(message_id=message_id, requeues=0)
                session.add(attempt)
            attempt.attempts, attempt.owner, attempt.started_at = 0, None, None
            attempt.requeues, attempt.requeued_at = (attempt.requeues or 0) + 1, now

    def silent_deliveries(
        self, pending_before: datetime, retrying_before: datetime
    ) -> list[tuple[Delivery, StudyResult]]:
        """Deliveries without news since the given times — pending ones since ``pending_before``, retrying
        ones since ``retrying_before`` — with their study round."""
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.execute(
                select(Delivery, StudyResult)
                .join(StudyResult, StudyResult.message_id == Delivery.message_id)
                .where(
                    ((Delivery.status == DeliveryStatus.PENDING) & (Delivery.updated_at < pending_before))
                    | ((Delivery.status == DeliveryStatus.RETRYING) & (Delivery.updated_at < retrying_before))
                )
            )
            return [(delivery, result) for delivery, result in rows]

    def mark_delivery_requeued(self, delivery: Delivery, now: datetime) -> bool:
        """Note that a silent delivery is being sent again (its ``updated_at`` becomes ``now``). False when
        the delivery changed since it was read (it is not silent any more, or another process re-sent it)."""
        with Session(self.engine) as session, session.begin():
            return (
                _changed(
                    session,
                    update(Delivery)
                    .where(
                        Delivery.id == delivery.id,
                        Delivery.status == delivery.status,
                        Delivery.attempts == delivery.attempts,
                        Delivery.updated_at == delivery.updated_at,
                    )
                    .values(updated_at=now),
                )
                == 1
            )

    def save_review(self, result: StudyResult, verdict: Verdict, reviewer: str) -> Review:
        """Record ``verdict`` on the finding of ``result``; a later mark of the same round replaces the
        earlier one. Raises ValueError when the round has no analysed finding (POSITIVE or NEGATIVE)."""
        if not Finding(result.finding).reviewable:
            raise ValueError(f"study round {result.message_id} has no analysed finding to review ({result.finding})")
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            row = session.scalars(select(Review).where(Review.message_id == result.message_id)).first()
            if row is None:
                row = Review(message_id=result.message_id)
                session.add(row)
            row.study_instance_uid, row.verdict, row.reviewer = result.study_instance_uid, Verdict(verdict), reviewer
            row.finding, row.model_sha256, row.created_at = result.finding, result.model_sha256, utcnow()
        return row

    def review(self, message_id: str) -> Review | None:
        """The current verdict on one study round, or None."""
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(select(Review).where(Review.message_id == message_id)).first()

    def reviews(self) -> list[Review]:
        """Every current verdict, oldest first."""
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Review).order_by(Review.created_at, Review.id)))


def _changed(session: Session, statement: Update) -> int:
    """How many rows an UPDATE matched (``Session.execute`` is typed as returning a Result without rowcount)."""
    return cast(CursorResult, session.execute(statement)).rowcount


def _count_start(session: Session, message_id: str, owner: str, now: datetime, seen: RoundState) -> bool:
    """One more start of the round by ``owner``, if its attempt row still counts ``seen.attempts`` starts; a
    round without a row gets one (the first start; another process inserting it too fails: IntegrityError)."""
    if session.get(RoundAttempt, message_id) is None:
        if seen.attempts:  # the row that ``seen`` was read from is gone: not the round that was decided on
            return False
        session.add(RoundAttempt(message_id=message_id, attempts=1, owner=owner, started_at=now, requeues=0))
        return True
    started = (
        update(RoundAttempt)
        .where(RoundAttempt.message_id == message_id, RoundAttempt.attempts == seen.attempts)
        .values(attempts=seen.attempts + 1, owner=owner, started_at=now)
    )
    return _changed(session, started) == 1


def _roll_up(session: Session, message_id: str) -> None:
    """The round's status from its deliveries: failed if any was dead-lettered, delivered if all arrived."""
    result = session.get(StudyResult, message_id)
    if result is not None:
        states = {d.status for d in session.scalars(select(Delivery).where(Delivery.message_id == message_id))}
        if DeliveryStatus.FAILED in states:
            result.status = StudyStatus.FAILED
        elif states == {DeliveryStatus.DELIVERED}:
            result.status = StudyStatus.DELIVERED


def _state(status: StudyStatus | None, attempt: RoundAttempt | None) -> RoundState:
    if attempt is None:
        return RoundState(status=status)
    return RoundState(
        status=status,
        attempts=attempt.attempts or 0,
        owner=attempt.owner,
        started_at=_posix(attempt.started_at),
        requeues=attempt.requeues or 0,
        requeued_at=_posix(attempt.requeued_at),
    )
