"""Synchronous ledger entries: credit or debit a Tally-native balance now, once per idempotency key.

The request follows Dodo's create-ledger-entry shape (`amount` decimal string, `entry_type`
credit|debit, `idempotency_key`, `reason`, `metadata`, `expires_at` for credits). The limit check is
the ledger's, under the balance's row lock. The decision an idempotency key names (the entry, or the
ledger's refusal) is recorded in the same transaction as the entry, so a retry with the same body
gets the same decision again and the same key with a different body is a conflict. How a decision
is rendered is the API layer's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue
from app.db import Database
from app.errors import Conflict, InvalidInput, NotFound, TallyError
from app.group_commit import is_outage
from app.ledger.amounts import AmountError, parse_decimal, to_atoms
from app.ledger.errors import LedgerRefusal, ProviderManaged
from app.ledger.posting import Source
from app.ledger.service import deduct, grant, lock_balance, sync_entitlement
from app.metering.models import LedgerRequest
from app.models import Balance, CreditEntitlement, Customer, LedgerEntry
from app.validation import Identifier, Instant, Scalar, Text, problem

log = logging.getLogger(__name__)

ENTRY_KIND = "manual_adjustment"


class EntryRejected(InvalidInput):
    """A ledger-entry request that is wrong in itself: nothing is written."""

    def __init__(self, message: str, *, code: str = "invalid_request") -> None:
        super().__init__(message, code=code)


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


@dataclass(frozen=True)
class EntryRequest:
    entry_type: str
    amount: str  # as sent; converted at the entitlement's precision
    idempotency_key: str
    reason: str | None
    metadata: dict[str, Any]
    expires_at: datetime | None

    @property
    def fingerprint(self) -> str:
        """What "the same body" means: the request's fields, canonically encoded and hashed."""
        canonical = json.dumps(
            {
                "entry_type": self.entry_type,
                "amount": str(parse_decimal(self.amount).normalize()),
                "reason": self.reason,
                "metadata": self.metadata,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EntryOutcome:
    """What a request decided: the posted entry, or the ledger's refusal (code and message)."""

    entitlement: CreditEntitlement
    customer_id: str
    request: EntryRequest
    atoms: int
    entry: LedgerEntry | None
    refusal_code: str | None = None
    refusal_message: str | None = None


class EntryBody(BaseModel):
    """The request body, as Dodo's create-ledger-entry takes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    entry_type: Literal["credit", "debit"]
    idempotency_key: Identifier
    reason: Text | None = None
    metadata: dict[Text, Scalar] | None = None
    expires_at: Instant | None = None


def parse_entry_request(payload: Any) -> EntryRequest:
    """Validate the body's shape; the amount's precision is checked against the entitlement later."""
    if not isinstance(payload, dict):
        raise EntryRejected("the body must be a JSON object")
    amount = payload.get("amount")
    try:
        body = EntryBody.model_validate(payload)
    except ValidationError as error:
        raise EntryRejected(problem(error)) from None
    try:
        value = parse_decimal(amount)
    except AmountError as error:
        raise EntryRejected(str(error), code="invalid_amount") from None
    if value <= 0:
        raise EntryRejected(f"amount must be above zero, got {amount!r}", code="invalid_amount")
    if body.expires_at is not None and body.entry_type != "credit":
        raise EntryRejected("expires_at applies to credits only")
    return EntryRequest(
        entry_type=body.entry_type,
        amount=str(amount),
        idempotency_key=body.idempotency_key,
        reason=body.reason,
        metadata=body.metadata or {},
        expires_at=body.expires_at,
    )


def _entitlement(session: Session, catalogue: Catalogue, entitlement_id: str) -> CreditEntitlement:
    entitlement = session.get(CreditEntitlement, entitlement_id)
    if entitlement is None and entitlement_id in catalogue.entitlements:
        # A catalogue entitlement no plan has used yet: its row is created on its first write.
        entitlement = sync_entitlement(session, catalogue.entitlements[entitlement_id])
    if entitlement is None:
        raise NotFound(f"no credit entitlement {entitlement_id!r}", code="entitlement_not_found")
    if entitlement.managed_by != "tally":
        raise ProviderManaged(
            f"entitlement {entitlement_id!r} is managed by {entitlement.managed_by}; "
            "its ledger changes only through the provider"
        )
    return entitlement


@dataclass(frozen=True)
class EntryAsk:
    """One request of a batch, with the time it arrived (its entry's time, and what `expires_at` is checked against)."""

    request: EntryRequest
    now: datetime


EntryAnswer = EntryOutcome | Exception
"""What one request of a batch gets: its decision, or the error that is its answer (a 4xx, or a fault)."""


class _RequestFailed(Exception):
    """Processing one request of a batch raised unexpectedly: the batch is retried without it."""

    def __init__(self, position: int, error: Exception) -> None:
        super().__init__(position, error)
        self.position, self.error = position, error


def create_ledger_entry(
    db: Database, catalogue: Catalogue, *, entitlement_id: str, customer_id: str, request: EntryRequest, now: datetime
) -> EntryOutcome:
    """Post a credit or debit once per idempotency key; the decision the key names. A batch of one."""
    [answer] = create_ledger_entries(
        db, catalogue, entitlement_id=entitlement_id, customer_id=customer_id, asks=[EntryAsk(request, now)]
    )
    if isinstance(answer, Exception):
        raise answer
    return answer


def create_ledger_entries(
    db: Database, catalogue: Catalogue, *, entitlement_id: str, customer_id: str, asks: Sequence[EntryAsk]
) -> list[EntryAnswer]:
    """Decide requests on one balance in arrival order, in ONE transaction under one row lock; each its answer.

    This is what makes a hot balance cheap: the lock is taken once per batch, not once per request,
    and the commit is shared. Each request still gets its own entry, before/after and decision, as if
    it had run alone in that order. A request whose processing raises unexpectedly is answered with
    that error and the batch is run again without it, so it cannot fail the others; an error not tied
    to one request (at commit) splits the batch in halves until it is. The database unreachable
    raises: every request of the batch gets the outage.
    """
    answers: list[EntryAnswer | None] = [None] * len(asks)
    pending = list(range(len(asks)))
    while pending:
        try:
            with db.write() as session:
                decided = _decide(session, catalogue, entitlement_id, customer_id, [asks[i] for i in pending])
        except _RequestFailed as failed:
            log.error("a ledger-entry request failed; its batch is retried without it", exc_info=failed.error)
            answers[pending.pop(failed.position)] = failed.error
            continue
        except TallyError as error:  # the entitlement or the customer: the same for all, and nothing is written
            decided = [error] * len(pending)
        except Exception as error:
            if is_outage(error):
                raise
            if len(pending) == 1:
                decided = [error]
            else:  # not tied to one request (at commit): isolate it by halves, in order
                middle = len(pending) // 2
                decided = [
                    answer
                    for half in (pending[:middle], pending[middle:])
                    for answer in create_ledger_entries(
                        db,
                        catalogue,
                        entitlement_id=entitlement_id,
                        customer_id=customer_id,
                        asks=[asks[i] for i in half],
                    )
                ]
        for position, answer in zip(pending, decided, strict=True):
            answers[position] = answer
        break
    return _filled(answers)


def _filled(answers: list[EntryAnswer | None]) -> list[EntryAnswer]:
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def _decide(
    session: Session, catalogue: Catalogue, entitlement_id: str, customer_id: str, asks: Sequence[EntryAsk]
) -> list[EntryAnswer]:
    """The batch's decisions within one transaction; raises what concerns the whole batch."""
    entitlement = _entitlement(session, catalogue, entitlement_id)
    if session.get(Customer, customer_id) is None:
        raise NotFound(f"no customer {customer_id!r}", code="customer_not_found")
    answers: list[EntryAnswer | None] = [None] * len(asks)
    atoms: list[int] = [0] * len(asks)
    for position, ask in enumerate(asks):
        try:
            atoms[position] = to_atoms(ask.request.amount, entitlement.precision)
        except AmountError as error:  # bad input: answered before the balance is even created
            answers[position] = EntryRejected(str(error), code="invalid_amount")
    valid = [position for position, answer in enumerate(answers) if answer is None]
    if not valid:
        return _filled(answers)

    balance = lock_balance(session, customer_id, entitlement_id)
    keys = {asks[position].request.idempotency_key for position in valid}
    recorded: dict[str, LedgerRequest] = {
        record.idempotency_key: record
        for record in session.execute(
            select(LedgerRequest).where(
                LedgerRequest.entitlement_id == entitlement_id,
                LedgerRequest.customer_id == customer_id,
                LedgerRequest.idempotency_key.in_(keys),
            )
        ).scalars()
    }
    new_records: list[LedgerRequest] = []
    for position in valid:
        ask = asks[position]
        outcome = EntryOutcome(entitlement, customer_id, ask.request, atoms[position], entry=None)
        try:
            answers[position] = _decide_one(session, balance, outcome, ask.now, recorded, new_records)
        except (EntryRejected, IdempotencyConflict) as error:  # raised before anything is written for it
            answers[position] = error
        except Exception as error:
            if is_outage(error):
                raise
            raise _RequestFailed(position, error) from error
    # The decisions' records, in one statement: a key is known new here, so only a fault can refuse one.
    session.add_all(new_records)
    session.flush()
    return _filled(answers)


def _decide_one(
    session: Session,
    balance: Balance,
    outcome: EntryOutcome,
    now: datetime,
    recorded: dict[str, LedgerRequest],
    new_records: list[LedgerRequest],
) -> EntryOutcome:
    """One request under the batch's lock: the decision its key already names, or a new one, recorded."""
    request, entitlement_id, customer_id = outcome.request, outcome.entitlement.id, outcome.customer_id
    previous = recorded.get(request.idempotency_key)
    if previous is not None:  # before any check that depends on the time: a retry gets the first decision
        if previous.request_hash != request.fingerprint:
            raise IdempotencyConflict(
                f"idempotency_key {request.idempotency_key!r} was already used with a different body"
            )
        entry = session.get(LedgerEntry, previous.ledger_entry_id) if previous.ledger_entry_id else None
        return replace(
            outcome, entry=entry, refusal_code=previous.refusal_code, refusal_message=previous.refusal_message
        )
    if request.expires_at is not None and request.expires_at <= now:
        raise EntryRejected("expires_at must be in the future")
    dedupe = f"api:{entitlement_id}:{customer_id}:{request.idempotency_key}"
    source = Source(idempotency_key=request.idempotency_key, description=request.reason)
    try:
        if request.entry_type == "credit":
            entry = grant(
                session,
                balance,
                outcome.atoms,
                source_key=dedupe,
                starts_at=now,
                expires_at=request.expires_at,
                source=source,
                kind=ENTRY_KIND,
            )
        else:
            # No look-up of an earlier entry: under this lock, no record for the key means no entry for it.
            entry = deduct(
                session,
                balance,
                outcome.atoms,
                now=now,
                kind=ENTRY_KIND,
                known_new=True,
                source=replace(source, dedupe_key=dedupe),
            )
        outcome = replace(outcome, entry=entry)
    except LedgerRefusal as refusal:
        outcome = replace(outcome, refusal_code=refusal.code, refusal_message=refusal.message)
    record = LedgerRequest(
        entitlement_id=entitlement_id,
        customer_id=customer_id,
        idempotency_key=request.idempotency_key,
        request_hash=request.fingerprint,
        refusal_code=outcome.refusal_code,
        refusal_message=outcome.refusal_message,
        ledger_entry_id=outcome.entry.id if outcome.entry else None,
        created_at=now,
    )
    recorded[request.idempotency_key] = record  # a repeat of the key later in this batch gets this decision
    new_records.append(record)
    return outcome
