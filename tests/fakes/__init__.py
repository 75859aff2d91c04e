"""Fake provider APIs (Stripe, Dodo Payments): real HTTP servers on 127.0.0.1 for SDK-level tests."""
