"""The worker process entry (`workers.process`): the only module that wires a broker at import, for Dramatiq's CLI."""
