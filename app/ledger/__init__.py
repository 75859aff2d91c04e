"""The ledger core: balances, grants and append-only entries. Free of HTTP and provider formats."""
