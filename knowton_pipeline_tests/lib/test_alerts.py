"""Alert deduplication and throttling (pure logic, property-based) and the webhook's Slack-shaped JSON."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.health.alerts import Alert, AlertBook, AlertDeliveryError, WebhookChannel

THROTTLE = 100.0


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=60.0)), max_size=60))
def test_a_flapping_key_sends_at_most_one_alert_per_window_and_recoveries_only_after_alerts(
    steps: list[tuple[bool, float]],
) -> None:
    book, now = AlertBook(), 0.0
    sent: list[tuple[float, str]] = []
    failing_before = False
    for failing, dt in steps:
        now += dt
        action = book.observe("k", failing, now, THROTTLE)
        if action:
            sent.append((now, action))
        if failing and not failing_before:
            # A new failure alerts exactly when no message went out within the throttle window.
            previous = [t for t, _ in sent[:-1]] if action else [t for t, _ in sent]
            quiet = not previous or now - max(previous) >= THROTTLE
            assert (action == "alert") == quiet
        if failing == failing_before:
            assert action is None  # no state change, nothing sent (deduplicated)
        failing_before = failing
    alerts = [t for t, a in sent if a == "alert"]
    assert all(b - a >= THROTTLE for a, b in itertools.pairwise(alerts))
    # Alerts and recoveries alternate, starting with an alert.
    kinds = [a for _, a in sent]
    assert all(k == ("alert" if i % 2 == 0 else "recover") for i, k in enumerate(kinds))


def test_the_book_survives_its_json_round_trip() -> None:
    book = AlertBook()
    assert book.observe("check", True, 10.0, THROTTLE) == "alert"
    again = AlertBook.from_json(json.loads(json.dumps(book.to_json())))
    assert again.observe("check", True, 20.0, THROTTLE) is None  # still failing: no second alert
    assert again.observe("check", False, 30.0, THROTTLE) == "recover"
    assert again.observe("check", True, 40.0, THROTTLE) is None  # flapped back within the window
    assert again.observe("check", False, 50.0, THROTTLE) is None  # its alert was suppressed: no recovery
    assert again.observe("check", True, 200.0, THROTTLE) == "alert"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []  # noqa: RUF012
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_webhook_posts_slack_json_and_a_failure_never_shows_the_url() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/T000/secret-token"
    try:
        alert = Alert("connect:unreachable", "error", "Kafka Connect is unreachable", "3 ticks", {"ticks": "3"})
        WebhookChannel(url).send(alert)
        [payload] = _Receiver.received
        assert payload["text"].endswith("Kafka Connect is unreachable")
        assert payload["attachments"][0]["fields"] == [{"title": "ticks", "value": "3", "short": True}]
        _Receiver.status = 500
        with pytest.raises(AlertDeliveryError) as info:
            WebhookChannel(url).send(alert)
        assert "secret-token" not in str(info.value) and "500" in str(info.value)
        assert "secret-token" not in repr(WebhookChannel(url))
    finally:
        server.shutdown()
