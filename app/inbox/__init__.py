"""The inbox: verified provider events, stored before they are acknowledged and applied once."""
