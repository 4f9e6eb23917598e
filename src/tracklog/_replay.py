"""``tracklog replay QUEUE``: deliver what a logger's queue still holds, exactly once.

A queue is left behind when a backend was still down at the delivery deadline, when an
output could not start (wrong settings), or when the delivery process itself was
killed. Replay is the same delivery code (:class:`tracklog._delivery.Delivery`) run on
a queue that has no trainer: each output continues from its own ack, in the same run
(the MLflow run id and W&B id are in the queue), and the runs end with the status the
trainer recorded, or KILLED if it died without closing. The queue is then removed, so
a second replay finds nothing to do; one cut off half-way continues where it stopped.
Two replays of one queue at once are safe: the second is refused while the first
holds the queue's delivery lock. Secrets are never in the queue: they come from the
environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``WANDB_API_KEY``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracklog._delivery import Delivery, targets
from tracklog._queue import MEDIA, Queue, find_queues, is_queue

__all__ = ["QueueBusyError", "ReplayResult", "find_queues", "replay"]


class QueueBusyError(RuntimeError):
    """The queue's trainer is alive, or another process is delivering it."""


@dataclass(frozen=True)
class ReplayResult:
    directory: Path
    delivered: int
    remaining: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0


def replay(
    directory: Path, *, timeout: float = 600.0, tracking_uri: str | None = None
) -> ReplayResult:
    """Deliver ``directory``'s undelivered messages; retry a down backend until ``timeout``.

    A queue that another replay delivered and removed meanwhile has nothing left.
    """
    try:
        queue = Queue(directory)
    except (OSError, sqlite3.Error):
        if is_queue(directory):
            raise
        return ReplayResult(directory, 0, 0)
    lock = queue.delivery_lock()
    try:
        try:
            trainer_lives = queue.trainer_lock().held_elsewhere()
            acquired = not trainer_lives and lock.acquire()
        except (OSError, sqlite3.Error):
            if is_queue(directory):
                raise
            return ReplayResult(directory, 0, 0)  # delivered and removed meanwhile
        if trainer_lives:
            owner = json.loads(queue.meta("owner") or "{}")
            raise QueueBusyError(
                f"{directory}: its logger (process {owner.get('pid', '?')}) is still running; "
                "its delivery process delivers it"
            )
        if not acquired:
            raise QueueBusyError(f"{directory}: another process is delivering it right now")
        header = queue.header()
        overrides: dict[str, dict[str, Any]] = {}
        for target in targets(header, None):
            if tracking_uri is not None and "tracking_uri" in type(target.settings).model_fields:
                overrides[target.consumer] = {"tracking_uri": tracking_uri}
        consumers = [entry["consumer"] for entry in header["outputs"]]
        consumers += [MEDIA] if header.get("media") else []
        with contextlib.suppress(OSError, sqlite3.Error):  # delivery retries it
            queue.ingest(final=True)  # so that what the trainer left in its inbox counts
        before = queue.pending(consumers)
        delivery = Delivery(
            queue,
            secrets=overrides,
            trainer_gone=lambda: True,
            deadline=time.monotonic() + timeout,
        )
        if delivery.run():
            return ReplayResult(directory, before, 0)
        remaining = queue.pending(consumers)
        return ReplayResult(directory, max(0, before - remaining), remaining)
    finally:
        lock.release()
        queue.close()
