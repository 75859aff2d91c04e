"""Nightly reconciliation: the providers' live state compared with Tally's, drift repaired and reported."""
