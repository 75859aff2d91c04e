"""Choosing the Dramatiq broker: Redis, RabbitMQ, or in-process for the embedded default."""

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

        client = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
        )
        return RedisBroker(client=client, namespace="tally")
    if settings.broker_kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
    # In-process: messages live in this process's memory and its own worker threads consume them.
    # Nothing is lost by that: the inbox is the durable record and the sweeper re-enqueues.
    return StubBroker()


def configure_broker(settings: Settings) -> Broker:
    broker = build_broker(settings)
    dramatiq.set_broker(broker)
    return broker


def start_inprocess_worker(broker: Broker, threads: int) -> dramatiq.Worker:
    """Worker threads inside the current process (the embedded default's `tally serve`)."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    return worker
