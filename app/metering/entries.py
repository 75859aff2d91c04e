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
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue
from app.db import Database
from app.errors import Conflict, InvalidInput, NotFound
from app.ledger.amounts import AmountError, parse_decimal, to_atoms
from app.ledger.errors import LedgerRefusal, ProviderManaged
from app.ledger.posting import Source
from app.ledger.service import deduct, grant, lock_balance, sync_entitlement
from app.metering.models import LedgerRequest
from app.models import CreditEntitlement, Customer, LedgerEntry
from app.validation import Identifier, Instant, Scalar, Text, problem

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


def _recorded(session: Session, entitlement_id: str, customer_id: str, request: EntryRequest) -> LedgerRequest | None:
    previous = session.execute(
        select(LedgerRequest).where(
            LedgerRequest.entitlement_id == entitlement_id,
            LedgerRequest.customer_id == customer_id,
            LedgerRequest.idempotency_key == request.idempotency_key,
        )
    ).scalar_one_or_none()
    if previous is not None and previous.request_hash != request.fingerprint:
        raise IdempotencyConflict(f"idempotency_key {request.idempotency_key!r} was already used with a different body")
    return previous


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


def create_ledger_entry(
    db: Database, catalogue: Catalogue, *, entitlement_id: str, customer_id: str, request: EntryRequest, now: datetime
) -> EntryOutcome:
    """Post a credit or debit once per idempotency key; the decision the key names."""
    with db.write() as session:
        entitlement = _entitlement(session, catalogue, entitlement_id)
        if session.get(Customer, customer_id) is None:
            raise NotFound(f"no customer {customer_id!r}", code="customer_not_found")
        try:
            atoms = to_atoms(request.amount, entitlement.precision)
        except AmountError as error:
            raise EntryRejected(str(error), code="invalid_amount") from None
        outcome = EntryOutcome(entitlement, customer_id, request, atoms, entry=None)

        balance = lock_balance(session, customer_id, entitlement_id)
        recorded = _recorded(session, entitlement_id, customer_id, request)
        if recorded is not None:  # before any check that depends on the time: a retry gets the first decision
            entry = session.get(LedgerEntry, recorded.ledger_entry_id) if recorded.ledger_entry_id else None
            return replace(
                outcome, entry=entry, refusal_code=recorded.refusal_code, refusal_message=recorded.refusal_message
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
                    atoms,
                    source_key=dedupe,
                    starts_at=now,
                    expires_at=request.expires_at,
                    source=source,
                    kind=ENTRY_KIND,
                )
            else:
                entry = deduct(
                    session, balance, atoms, now=now, kind=ENTRY_KIND, source=replace(source, dedupe_key=dedupe)
                )
            outcome = replace(outcome, entry=entry)
        except LedgerRefusal as refusal:
            outcome = replace(outcome, refusal_code=refusal.code, refusal_message=refusal.message)
        session.add(
            LedgerRequest(
                entitlement_id=entitlement_id,
                customer_id=customer_id,
                idempotency_key=request.idempotency_key,
                request_hash=request.fingerprint,
                refusal_code=outcome.refusal_code,
                refusal_message=outcome.refusal_message,
                ledger_entry_id=outcome.entry.id if outcome.entry else None,
                created_at=now,
            )
        )
        return outcome
