"""A flood sender for test_memory_limit.py: ``_mem_sender.py ADDRESS NAME``.

Sends 16 MiB messages (a SHA-256 of the rest, then a counter and random
bytes) to channels nobody reads until the broker refuses ``REFUSALS``
times, or ``DEADLINE`` seconds pass. Prints one JSON line: what it sent and
the reasons it was refused."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from django_message_broker import SyncClient
from django_message_broker.exceptions import QueueFull

SIZE = 16 << 20
REFUSALS = 3
DEADLINE = 15.0


def main() -> None:
    address, name = sys.argv[1], sys.argv[2]
    blob = os.urandom(SIZE - 32 - 8)
    client = SyncClient(address, timeout=10.0)
    sent, reasons = 0, []
    stop = time.monotonic() + DEADLINE
    try:
        while len(reasons) < REFUSALS and time.monotonic() < stop:
            payload = sent.to_bytes(8, "big") + blob
            body = hashlib.sha256(payload).digest() + payload
            try:
                client.send(f"flood.{name}.{sent % 4}", body, ttl=120, capacity=100)
                sent += 1
            except QueueFull as exc:
                reasons.append(getattr(exc, "reason", "") or str(exc))
                time.sleep(0.05)
    finally:
        client.close()
    print(json.dumps({"sent": sent, "reasons": reasons}), flush=True)


if __name__ == "__main__":
    main()
