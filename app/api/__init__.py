"""The internal read/write API that services call with bearer tokens."""
