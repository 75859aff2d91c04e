"""Exact amounts: Decimal at the edges, integer atoms at the entitlement's precision inside."""

from __future__ import annotations

from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    Context,
    Decimal,
    DecimalException,
    InvalidOperation,
    Overflow,
    Underflow,
)

MAX_ATOMS = 2**63 - 1
MAX_ATOMS_DIGITS = len(str(MAX_ATOMS))
# Exact scaling: no rounding at any number of digits, and every exponent a Decimal can be written with.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[InvalidOperation, Overflow, Underflow])


class AmountError(ValueError):
    """An amount that cannot be represented exactly."""


def parse_decimal(value: object) -> Decimal:
    """A Decimal from a JSON string or integer; floats are refused because they are already inexact."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise AmountError(f"amount must be a decimal string or an integer, got {type(value).__name__}")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise AmountError(f"amount {value!r} is not a number") from None
    if not number.is_finite():
        raise AmountError(f"amount {value!r} is not a finite number")
    return number


def to_atoms(value: Decimal | int | str, precision: int) -> int:
    """Convert to integer atoms, refusing anything finer than the precision allows or wider than 64 bits.

    The magnitude is checked before anything is computed, and the scaling runs in a context that can
    neither round nor overflow: in the default one `0.0000000001000…0001` (29 digits or more) rounded to
    1 atom, `1E+999999` raised `decimal.Overflow`, and `1E+100000` took a quarter of a second to become
    an int before being refused.
    """
    number = value if isinstance(value, Decimal) else parse_decimal(value)
    if not number.is_finite():
        raise AmountError(f"amount {number} is not a finite number")
    if not number:
        return 0
    if number.adjusted() + precision >= MAX_ATOMS_DIGITS:  # at least 10**19 atoms
        raise AmountError(f"amount {number} is too large")
    try:
        scaled = number.scaleb(precision, _EXACT)
    except DecimalException:  # an exponent beyond even that context's range: places beyond counting
        raise AmountError(f"amount {number} has more than {precision} decimal places") from None
    if scaled != scaled.to_integral_value():
        raise AmountError(f"amount {number} has more than {precision} decimal places")
    atoms = int(scaled)
    if abs(atoms) > MAX_ATOMS:
        raise AmountError(f"amount {number} is too large")
    return atoms


def from_atoms(atoms: int, precision: int) -> Decimal:
    return Decimal(atoms).scaleb(-precision)


def format_atoms(atoms: int, precision: int) -> str:
    """A decimal string with exactly `precision` places, as the Dodo seeds return balances."""
    return f"{from_atoms(atoms, precision):.{precision}f}"


def json_number(value: Decimal) -> int | float:
    """A JSON number where a seed wants one: an integer when whole, else the nearest double."""
    return int(value) if value == value.to_integral_value() else float(value)
