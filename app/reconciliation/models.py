"""Stored reconciliation runs and the drift each one found.

A scheduled run carries the UTC date it was scheduled for, unique per provider: two clock processes
firing at once, or a message delivered twice, insert the same row and only one of them runs it.
Manual runs leave the date empty (NULL is never equal to NULL in a unique constraint), so they are
always allowed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import utcnow
from app.models import Base, BigId


class ReconciliationRun(Base):
    __tablename__ = "reconciliation_runs"
    __table_args__ = (UniqueConstraint("provider", "scheduled_for"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    scheduled_for: Mapped[str | None] = mapped_column(String(10))  # YYYY-MM-DD for the clock's runs
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | succeeded | failed
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    since: Mapped[datetime | None] = mapped_column()  # start of the failed-delivery window it used
    checked: Mapped[int] = mapped_column(BigInteger, default=0)
    matched: Mapped[int] = mapped_column(BigInteger, default=0)
    repaired: Mapped[int] = mapped_column(BigInteger, default=0)
    drifted: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    api_calls: Mapped[int] = mapped_column(BigInteger, default=0)


class ReconciliationDrift(Base):
    """One field of one object that differed: both values, and what the run did about it."""

    __tablename__ = "reconciliation_drifts"
    __table_args__ = (Index("ix_reconciliation_drifts_run_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"))
    object_type: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(255))
    field: Mapped[str] = mapped_column(String(64))
    tally_value: Mapped[str | None] = mapped_column(Text)
    provider_value: Mapped[str | None] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReconciliationSeen(Base):
    """Provider object ids a running run has listed, so "known to Tally, unknown to the provider" is a
    query, not a set in memory; emptied when the run ends."""

    __tablename__ = "reconciliation_seen"

    run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"), primary_key=True)
    object_id: Mapped[str] = mapped_column(String(255), primary_key=True)
