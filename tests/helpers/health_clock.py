"""`/health` sampled in a thread while a test or a benchmark loads the server: each probe's latency, and the
engine's batch counter (`/health` detail `batches`), whose longest gap between two counts is the longest engine
batch seen under the load (idle gaps included: a generous measure)."""

from __future__ import annotations

import threading
import time

import httpx


class HealthClock:
    def __init__(self, url: str, *, every_s: float = 0.25, timeout_s: float = 60.0) -> None:
        self.url, self.every_s, self.timeout_s = url, every_s, timeout_s
        self.latencies: list[float] = []  # seconds per probe; inf for one that failed or was not a 200
        self.longest, self.batches = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-clock")

    def _run(self) -> None:
        last_count: int | None = None
        last_at = time.monotonic()
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                count = last_count
                try:
                    r = client.get(self.url + "/health")
                    took = time.monotonic() - started if r.status_code == 200 else float("inf")
                    count = r.json().get("detail", {}).get("batches", last_count)
                except (httpx.HTTPError, ValueError, AttributeError):
                    took = float("inf")
                self.latencies.append(took)
                now = time.monotonic()
                if count != last_count:
                    if last_count is not None:
                        self.longest = max(self.longest, now - last_at)
                        self.batches += 1
                    last_count, last_at = count, now
                self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def __enter__(self) -> HealthClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)
