"""Standard Webhooks verification of Dodo deliveries: the known-good vector, its negative cases, and
malformed headers over real HTTP (always 400/401 with {code, message}, never a 500, nothing stored)."""

from __future__ import annotations

import json

import pytest
from dodo_builders import DODO_OLD_KEY, deliver, sign, subscription
from sqlalchemy import func, select

from app.api.errors import status_for
from app.errors import TallyError
from app.models import InboxEvent
from app.providers.dodo.signature import verify_dodo_signature

# The known-good vector of PROVIDERS.md.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(signature: str = SIGNATURE, *, msg_id: str = MSG_ID, timestamp: str = str(TIMESTAMP)) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signature}


def refusal(
    body: bytes, given: dict[str, str], keys: tuple[str, ...] = (SECRET,), now: float = TIMESTAMP
) -> TallyError:
    with pytest.raises(TallyError) as caught:
        verify_dodo_signature(body, given, keys, now=now)
    return caught.value


def test_the_known_good_vector_verifies_and_yields_the_webhook_id():
    assert verify_dodo_signature(BODY, headers(), (SECRET,), now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize("skew", [-300, 300])
def test_five_minutes_either_way_is_accepted(skew):
    assert verify_dodo_signature(BODY, headers(), (SECRET,), now=TIMESTAMP + skew) == MSG_ID


@pytest.mark.parametrize("skew", [-301, 301, 86400])
def test_outside_five_minutes_is_refused_as_stale(skew):
    error = refusal(BODY, headers(), now=TIMESTAMP + skew)
    assert (status_for(error), error.code) == (401, "stale_signature")


@pytest.mark.parametrize(
    "body, given",
    [
        (b'{"test": 2432232315}', headers()),  # tampered body
        (BODY + b" ", headers()),  # not the exact bytes
        (BODY, headers(msg_id="msg_other")),  # the id is signed too
        (BODY, headers(timestamp=str(TIMESTAMP + 1))),  # so is the timestamp
        (BODY, headers("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=")),  # one bit off
    ],
)
def test_anything_changed_fails_verification(body, given):
    error = refusal(body, given, now=int(given["webhook-timestamp"]))
    assert (status_for(error), error.code) == (401, "invalid_signature")


def test_a_wrong_key_fails_and_any_configured_key_may_match():
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    assert refusal(BODY, headers(), keys=(other,)).code == "invalid_signature"
    assert verify_dodo_signature(BODY, headers(), (other, SECRET), now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize(
    "signature",
    [
        f"v1,QUJD {SIGNATURE}",  # several signatures, space-separated: one valid is enough
        f"{SIGNATURE} v1,QUJD",
        f"v2,QUJD {SIGNATURE}",  # unknown versions are skipped
        f"v1,!!notbase64!! {SIGNATURE}",  # a malformed entry (the library would raise ValueError) next to a good one
        f"garbage {SIGNATURE}",
    ],
)
def test_one_valid_signature_among_several_is_enough(signature):
    assert verify_dodo_signature(BODY, headers(signature), (SECRET,), now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize(
    "given, code",
    [
        ({}, "missing_signature"),
        ({"webhook-id": MSG_ID, "webhook-timestamp": str(TIMESTAMP)}, "missing_signature"),
        ({"webhook-timestamp": str(TIMESTAMP), "webhook-signature": SIGNATURE}, "missing_signature"),
        (headers(timestamp="yesterday"), "malformed_signature"),
        (headers(timestamp="1614265330.5"), "malformed_signature"),
        (headers(timestamp="-1614265330"), "malformed_signature"),
        (headers(timestamp="9" * 5000), "malformed_signature"),
        (headers("g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="), "malformed_signature"),  # no version
        (headers("v1,"), "malformed_signature"),
        (headers("v1,!!!"), "malformed_signature"),
        (headers("v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="), "malformed_signature"),
        (headers("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1O"), "malformed_signature"),  # bad padding
        (headers("   "), "malformed_signature"),
    ],
)
def test_malformed_headers_are_a_400(given, code):
    error = refusal(BODY, given)
    assert (status_for(error), error.code) == (400, code)


def test_a_body_that_is_not_utf8_is_a_400():
    assert status_for(refusal(b"\xff\xfe", headers())) == 400


# --- over HTTP -----------------------------------------------------------------------------------


def inbox_count(db) -> int:
    with db.read() as session:
        return session.execute(select(func.count()).select_from(InboxEvent)).scalar_one()


def test_a_signed_delivery_is_stored_and_the_rotated_key_still_works(db, dodo_http):
    assert deliver(dodo_http, subscription("sub_sig1", "cus_sig"), "msg_sig_1").status_code == 200
    assert deliver(dodo_http, subscription("sub_sig2", "cus_sig"), "msg_sig_2", key=DODO_OLD_KEY).status_code == 200
    with db.read() as session:
        ids = set(session.execute(select(InboxEvent.provider_event_id).where(InboxEvent.provider == "dodo")).scalars())
    assert ids == {"msg_sig_1", "msg_sig_2"}


def _signed_body() -> tuple[str, dict[str, str]]:
    body = json.dumps(subscription("sub_bad", "cus_bad"))
    return body, sign(body, "msg_bad")


@pytest.mark.parametrize(
    "mutate, status",
    [
        (lambda h: h.pop("webhook-signature"), 400),
        (lambda h: h.pop("webhook-id"), 400),
        (lambda h: h.update({"webhook-timestamp": "soon"}), 400),
        (lambda h: h.update({"webhook-timestamp": "1614265330"}), 401),
        (lambda h: h.update({"webhook-signature": "v1,AAAA"}), 401),
        (lambda h: h.update({"webhook-signature": "v1"}), 400),
        (lambda h: h.update({"webhook-signature": "v1,,,, ,,"}), 400),
        (lambda h: h.update({"webhook-signature": "v1,\u00e9\u00e9"}), 400),
        (lambda h: h.update({"webhook-id": "m\u00e9g"}), 401),
        (lambda h: h.update({"webhook-timestamp": "\u00b2\u00b3"}), 400),
    ],
)
def test_bad_headers_over_http_are_refused_cleanly_and_store_nothing(db, dodo_http, mutate, status):
    body, given = _signed_body()
    mutate(given)
    encoded = {name: value.encode("latin-1") for name, value in given.items()}
    response = dodo_http.post("/webhooks/dodo", content=body, headers=encoded)
    assert response.status_code == status
    assert set(response.json()) == {"code", "message"}
    assert inbox_count(db) == 0


def test_a_signed_body_that_is_not_json_is_a_400(db, dodo_http):
    response = dodo_http.post("/webhooks/dodo", content="not json", headers=sign("not json", "msg_notjson"))
    assert response.status_code == 400 and response.json()["code"] == "invalid_json"
    assert inbox_count(db) == 0


def test_without_a_configured_key_the_receiver_answers_503(db, http):
    body, given = _signed_body()
    response = http.post("/webhooks/dodo", content=body, headers=given)
    assert response.status_code == 503 and response.json()["code"] == "not_configured"
