"""The operator's `tally` commands, run as an operator would: as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from builders import deliver, event, subscription_object
from conftest import wait_for
from sqlalchemy import select, update

from app.keys import hash_token
from app.models import ApiKey, Balance, InboxEvent


def tally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=dict(os.environ), capture_output=True, text=True, timeout=120
    )


def test_keys_are_printed_once_and_stored_hashed(db):
    result = tally("keys", "create", "--customer", "cus_cli")
    assert result.returncode == 0
    token = result.stdout.strip()
    assert token.startswith("tly_")
    with db.read() as session:
        key = session.execute(select(ApiKey)).scalar_one()
    assert (key.scope, key.customer_id, key.token_hash) == ("customer", "cus_cli", hash_token(token))
    assert token not in key.token_hash


def test_events_list_show_and_verify(db, http, worker):
    now = int(time.time())
    deliver(
        http,
        event(
            "evt_cli",
            "customer.subscription.created",
            subscription_object("sub_cli", "cus_cli", "active", now, now + 86400),
        ),
    )
    deliver(http, event("evt_cli_bad", "customer.subscription.updated", {"id": "sub_x", "status": "??"}))

    def done() -> bool:
        with db.read() as session:
            return set(session.execute(select(InboxEvent.status)).scalars()) == {"processed", "failed"}

    wait_for(done)
    listing = tally("events", "list", "--status", "failed")
    assert listing.returncode == 0
    assert "evt_cli_bad" in listing.stdout and "evt_cli " not in listing.stdout
    assert "failed: 1" in listing.stdout and "processed: 1" in listing.stdout

    with db.read() as session:
        event_id = session.execute(select(InboxEvent.id).where(InboxEvent.provider_event_id == "evt_cli")).scalar_one()
    shown = json.loads(tally("events", "show", str(event_id)).stdout)
    assert (shown["status"], shown["body"]["id"]) == ("processed", "evt_cli")

    assert tally("verify").returncode == 0
    with db.write() as session:
        session.execute(update(Balance).values(balance=Balance.balance + 7))
    broken = tally("verify")
    assert broken.returncode == 1
    assert "entries sum to" in broken.stdout
