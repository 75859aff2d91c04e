"""The doorbell's transport: the Dramatiq broker the settings ask for.

The SQL rows are the durable record; a broker message only says "there is work" (`app.doorbell`).
Redis or RabbitMQ in production; on the embedded default an in-process broker (Dramatiq's
StubBroker) whose worker threads run inside `tally serve`. Nothing is lost by keeping messages in
memory there: the inbox is the record and the sweeper rings again.
"""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.broker import Broker
from dramatiq.brokers.stub import StubBroker

from app.config import Settings


def build_broker(settings: Settings) -> Broker:
    """A broker for the configured URL. Short timeouts: a webhook must not hang on a dead broker."""
    if settings.broker_kind == "redis":
        from dramatiq.brokers.redis import RedisBroker

        assert settings.broker_url is not None
        client = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
        )
        return RedisBroker(client=client, namespace="tally")  # type: ignore[no-untyped-call]  # dramatiq leaves it unannotated
    if settings.broker_kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
    return StubBroker()


def ping(broker: Broker) -> None:
    """Raise unless the broker answers (a StubBroker always does)."""
    client = getattr(broker, "client", None)
    if client is not None:
        client.ping()  # redis
    elif hasattr(broker, "connection"):
        _ = broker.connection  # rabbitmq: opens (or reuses) this thread's connection


def start_inprocess_worker(broker: Broker, threads: int) -> dramatiq.Worker:
    """Worker threads inside the current process (the embedded default's `tally serve`)."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    return worker
