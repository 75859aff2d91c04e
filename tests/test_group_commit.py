"""Group-committed intake under concurrency: every 2xx stored exactly once, duplicates flagged."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from builders import sign
from sqlalchemy import func, select

from app.models import InboxEvent


def test_200_concurrent_webhooks_with_duplicates_are_stored_once_each(db, http):
    now = int(time.time())
    distinct = [
        json.dumps(
            {
                "id": f"evt_gc_{n}",
                "object": "event",
                "type": "charge.succeeded",
                "created": now,
                "data": {"object": {"id": f"ch_{n}"}},
            }
        )
        for n in range(180)
    ]
    deliveries = distinct + random.Random(7).sample(distinct, 20)  # 10 % sent twice
    random.Random(11).shuffle(deliveries)

    def send(body: str) -> tuple[str, int, bool]:
        response = http.post(
            "/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"},
        )
        return json.loads(body)["id"], response.status_code, response.json().get("duplicate", False)

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, deliveries))

    assert {status for _, status, _ in answers} == {200}
    first_answers = [event_id for event_id, _, duplicate in answers if not duplicate]
    assert sorted(first_answers) == sorted(json.loads(body)["id"] for body in distinct)  # each new exactly once
    assert sum(duplicate for _, _, duplicate in answers) == 20
    with db.read() as session:
        stored = session.execute(
            select(InboxEvent.provider_event_id, func.count()).group_by(InboxEvent.provider_event_id)
        ).all()
    assert len(stored) == 180 and {count for _, count in stored} == {1}
