"""Dramatiq workers and the clock. Importing `workers.actors` configures the broker from the settings."""
