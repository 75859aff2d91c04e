"""Usage metering: ingest, meters that turn usage events into deductions, the synchronous write API."""
