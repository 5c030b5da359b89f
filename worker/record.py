"""Record — each study's outcome, each delivery and each reviewer's verdict become rows in a small SQL
store (no patient names, ids or birth dates). SQLite by default; any SQLAlchemy URL (e.g. PostgreSQL)
works. The worklist reads it."""

import enum
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, Enum, Float, Integer, String, Text, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


OUTSIDE_USE = "outside_use"  # StudyResult.status of a round whose images the intended-use gate refused


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StudyResult(Base):
    """One analysed study round: what the model found and what was produced."""

    __tablename__ = "study_results"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))  # analysing | analysed | not_analysed | outside_use |
    # delivered | failed — outside_use: no image analysed, the intended-use gate refused them
    finding: Mapped[str] = mapped_column(String(16))  # POSITIVE | NEGATIVE | NOT_ANALYSED
    probability: Mapped[float | None] = mapped_column(Float)  # study level: the highest image probability
    threshold: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    images: Mapped[list] = mapped_column(JSON)  # per image: source UID, probability or reason, SC/SR UIDs
    timings_ms: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    analysed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Delivery(Base):
    """The state of sending one study round's outputs to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | retrying | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class DeadLetterRow(Base):
    """A delivery that used up its attempts (used when the broker is not Redis)."""

    __tablename__ = "dead_letters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    record: Mapped[str] = mapped_column(Text)


class Verdict(str, enum.Enum):
    """A reviewer's judgement of a study's finding."""

    AGREE = "agree"
    DISAGREE = "disagree"


REVIEWABLE_FINDINGS = ("POSITIVE", "NEGATIVE")  # a finding the model actually made


class Review(Base):
    """The current verdict of a reviewer on one study round's finding (one row per round)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[Verdict] = mapped_column(Enum(Verdict, native_enum=False, length=16, validate_strings=True,
                                                  values_callable=lambda kind: [member.value for member in kind]))
    reviewer: Mapped[str] = mapped_column(String(64))  # the web sign-in user name
    finding: Mapped[str] = mapped_column(String(16))  # the round's finding when it was reviewed
    model_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Store:
    """The outcome store; creates its tables on first use."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)
        database = self.engine.url.database
        if self.engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        Base.metadata.create_all(self.engine)

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
            return list(session.scalars(select(StudyResult).where(StudyResult.study_instance_uid == study_instance_uid)
                                        .order_by(StudyResult.round, StudyResult.analysed_at)))

    def update_delivery(self, message_id: str, destination: str, *, status: str, attempts: int,
                        error: str | None = None) -> None:
        """Record the latest state of one delivery, and roll the study's status up from all of them."""
        with Session(self.engine) as session, session.begin():
            row = session.scalars(select(Delivery).where(Delivery.message_id == message_id,
                                                         Delivery.destination == destination)).first()
            if row is None:
                row = Delivery(message_id=message_id, destination=destination)
                session.add(row)
            row.status, row.attempts, row.last_error = status, attempts, (error or None) and error[:512]
            session.flush()
            result = session.get(StudyResult, message_id)
            if result is not None:
                states = {d.status for d in session.scalars(select(Delivery).where(Delivery.message_id == message_id))}
                if "failed" in states:
                    result.status = "failed"
                elif states == {"delivered"}:
                    result.status = "delivered"

    def deliveries(self, message_id: str) -> list[Delivery]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Delivery).where(Delivery.message_id == message_id)))

    def put_dead_letter(self, letter_id: str, record: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(DeadLetterRow(id=letter_id, record=record))

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

    def save_review(self, result: StudyResult, verdict: Verdict, reviewer: str) -> Review:
        """Record ``verdict`` on the finding of ``result``; a later mark of the same round replaces the
        earlier one. Raises ValueError when the round has no analysed finding (POSITIVE or NEGATIVE)."""
        if result.finding not in REVIEWABLE_FINDINGS:
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
