"""A real HTTP endpoint for the alert webhook, recording what it receives (tests only)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest


class Receiver:
    """A real HTTP endpoint that records what the alert webhook posts.

    `fail_with(status, times)` makes it answer the next `times` posts (every post when None) with
    `status` instead of 200; `received` holds only the posts it accepted, `attempts` every post."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                attempts.append(body)
                status = receiver._next_status()
                if status == 200:
                    received.append(body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.attempts = attempts
        self._lock = threading.Lock()
        self._fail_status = 200
        self._fail_times: int | None = 0
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_with(self, status: int, times: int | None = None) -> None:
        with self._lock:
            self._fail_status, self._fail_times = status, times

    def heal(self) -> None:
        self.fail_with(200, 0)

    def _next_status(self) -> int:
        with self._lock:
            if self._fail_times is None:
                return self._fail_status
            if self._fail_times > 0:
                self._fail_times -= 1
                return self._fail_status
            return 200

    def texts(self) -> list[str]:
        return [r["text"] for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
