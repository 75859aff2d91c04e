from builders import deliver, event, subscription_object
from conftest import wait_for
from sqlalchemy import select

from app.models import InboxEvent


def test_a_delivered_subscription_is_applied_by_the_worker(db, http, worker):
    import time
    now = int(time.time())
    response = deliver(http, event("evt_h1", "customer.subscription.created",
                                   subscription_object("sub_h", "cus_h", "active", now, now + 86400 * 30)))
    assert response.status_code == 200

    def processed():
        with db.read() as session:
            return session.execute(select(InboxEvent.status)).scalar_one() == "processed"
    wait_for(processed)
