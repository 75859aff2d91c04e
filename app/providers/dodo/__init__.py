"""Dodo Payments: Standard Webhooks signatures, payload parsing, and handlers that mirror its credit ledger."""
