"""Stripe: webhook signatures, payload parsing, and the handlers that turn events into ledger changes."""
