"""The worker process: `dramatiq workers.process` (what `tally worker` runs).

Dramatiq's command line imports a module and takes the broker that module set up, so this is the
one module whose import wires things together: settings, the database, the broker and the actors.
Nothing in `app` imports it.
"""

from __future__ import annotations

import dramatiq

from app.config import get_settings
from app.db import get_database
from app.queue import build_broker
from app.tasks import declare_jobs

settings = get_settings()
broker = build_broker(settings)
dramatiq.set_broker(broker)
jobs = declare_jobs(broker, settings, get_database())
