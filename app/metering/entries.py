"""Synchronous ledger entries: `POST /credit-entitlements/{ce}/balances/{customer_id}/ledger-entries`.

The request and answer follow Dodo's create-ledger-entry shape (`amount` decimal string, `entry_type`
credit|debit, `idempotency_key`, `reason`, `metadata`, `expires_at` for credits; answer with
before/after values as decimal strings). The limit check is the ledger's, under the balance's row
lock. The first answer to an idempotency key is stored in the same transaction as the entry, so a
retry with the same body gets it again (a 400 refusal included: the key names one decision) and the
same key with a different body is a 409.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue
from app.db import Database
from app.errors import ApiError
from app.ledger.amounts import AmountError, format_atoms, parse_decimal, to_atoms
from app.ledger.service import (
    InsufficientCredits,
    LimitExceeded,
    Source,
    deduct,
    grant,
    lock_balance,
    sync_entitlement,
)
from app.metering.models import LedgerRequest
from app.models import Balance, CreditEntitlement, Customer, LedgerEntry

ENTRY_TYPES = ("credit", "debit")
ENTRY_KIND = "manual_adjustment"
MAX_KEY_LENGTH = 255


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


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def parse_entry_request(payload: Any) -> EntryRequest:
    """Validate the body's shape; the amount's precision is checked against the entitlement later."""
    if not isinstance(payload, dict):
        raise _invalid("the body must be a JSON object")
    entry_type = payload.get("entry_type")
    if entry_type not in ENTRY_TYPES:
        raise _invalid('entry_type must be "credit" or "debit"')
    key = payload.get("idempotency_key")
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_LENGTH:
        raise _invalid(f"idempotency_key is required: a non-empty string of at most {MAX_KEY_LENGTH} characters")
    amount = payload.get("amount")
    try:
        value = parse_decimal(amount)
    except AmountError as error:
        raise ApiError(422, "invalid_amount", str(error)) from None
    if value <= 0:
        raise ApiError(422, "invalid_amount", f"amount must be above zero, got {amount!r}")
    reason = payload.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _invalid("reason must be a string")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, (str, int, float, bool)) for v in metadata.values()):
        raise _invalid("metadata must be an object of strings, numbers and booleans")
    expires_at = None
    if payload.get("expires_at") is not None:
        if entry_type != "credit":
            raise _invalid("expires_at applies to credits only")
        try:
            expires_at = datetime.fromisoformat(str(payload["expires_at"]))
        except ValueError:
            raise _invalid("expires_at must be an ISO 8601 date-time") from None
        if expires_at.tzinfo is None:
            raise _invalid("expires_at needs a time zone (for example a trailing Z)")
    return EntryRequest(
        entry_type=entry_type,
        amount=str(amount),
        idempotency_key=key,
        reason=reason,
        metadata=metadata,
        expires_at=expires_at,
    )


def entry_document(
    entry: LedgerEntry, balance: Balance, entitlement: CreditEntitlement, request: EntryRequest, atoms: int
) -> dict[str, Any]:
    """Dodo's BalanceCreateLedgerEntryResponse."""
    precision = entitlement.precision
    return {
        "id": str(entry.id),
        "amount": format_atoms(atoms, precision),
        "balance_before": format_atoms(entry.balance_before, precision),
        "balance_after": format_atoms(entry.balance_after, precision),
        "overage_before": format_atoms(entry.overage_before, precision),
        "overage_after": format_atoms(entry.overage_after, precision),
        "created_at": entry.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "credit_entitlement_id": entitlement.id,
        "customer_id": balance.customer_id,
        "entry_type": request.entry_type,
        "is_credit": request.entry_type == "credit",
        "metadata": request.metadata,
        "grant_id": str(entry.grant_id) if entry.grant_id is not None else None,
        "reason": request.reason,
    }


def _previous_answer(
    session: Session, entitlement_id: str, customer_id: str, request: EntryRequest
) -> tuple[int, dict[str, Any]] | None:
    previous = session.execute(
        select(LedgerRequest).where(
            LedgerRequest.entitlement_id == entitlement_id,
            LedgerRequest.customer_id == customer_id,
            LedgerRequest.idempotency_key == request.idempotency_key,
        )
    ).scalar_one_or_none()
    if previous is None:
        return None
    if previous.request_hash != request.fingerprint:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"idempotency_key {request.idempotency_key!r} was already used with a different body",
        )
    return previous.status_code, previous.response


def create_ledger_entry(
    db: Database, catalogue: Catalogue, *, entitlement_id: str, customer_id: str, request: EntryRequest, now: datetime
) -> tuple[int, dict[str, Any]]:
    """Post a credit or debit once per idempotency key; (HTTP status, body) of the first answer."""
    with db.write() as session:
        entitlement = session.get(CreditEntitlement, entitlement_id)
        if entitlement is None and entitlement_id in catalogue.entitlements:
            # A catalogue entitlement no plan has used yet: its row is created on its first write.
            entitlement = sync_entitlement(session, catalogue.entitlements[entitlement_id])
        if entitlement is None:
            raise ApiError(404, "entitlement_not_found", f"no credit entitlement {entitlement_id!r}")
        if entitlement.managed_by != "tally":
            raise ApiError(
                409,
                "provider_managed",
                f"entitlement {entitlement_id!r} is managed by {entitlement.managed_by}; "
                "its ledger changes only through the provider",
            )
        if session.get(Customer, customer_id) is None:
            raise ApiError(404, "customer_not_found", f"no customer {customer_id!r}")
        try:
            atoms = to_atoms(request.amount, entitlement.precision)
        except AmountError as error:
            raise ApiError(422, "invalid_amount", str(error)) from None

        balance = lock_balance(session, customer_id, entitlement_id)
        answered = _previous_answer(session, entitlement_id, customer_id, request)
        if answered is not None:
            return answered  # before any check that depends on the time: a retry gets the first answer
        if request.expires_at is not None and request.expires_at <= now:
            raise _invalid("expires_at must be in the future")
        dedupe = f"api:{entitlement_id}:{customer_id}:{request.idempotency_key}"
        source = Source(idempotency_key=request.idempotency_key, description=request.reason)
        entry: LedgerEntry | None = None
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
                    session,
                    balance,
                    atoms,
                    now=now,
                    kind=ENTRY_KIND,
                    source=Source(**{**source.__dict__, "dedupe_key": dedupe}),
                )
            status, body = 201, entry_document(entry, balance, entitlement, request, atoms)
        except (LimitExceeded, InsufficientCredits) as refusal:
            status, body = 400, {"code": refusal.code, "message": refusal.message}
        session.add(
            LedgerRequest(
                entitlement_id=entitlement_id,
                customer_id=customer_id,
                idempotency_key=request.idempotency_key,
                request_hash=request.fingerprint,
                status_code=status,
                response=body,
                ledger_entry_id=entry.id if entry else None,
                created_at=now,
            )
        )
        return status, body
