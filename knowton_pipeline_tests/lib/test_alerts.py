"""Alert deduplication and throttling (pure logic, property-based), and the webhook: Slack-shaped JSON,
bounded retries against a real HTTP receiver, nothing recorded as sent unless delivered."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.health.alerts import (
    Alert,
    AlertBook,
    AlertDeliveryError,
    Dispatch,
    LogChannel,
    WebhookChannel,
)
from knowton_pipeline_tests.helpers import Receiver

THROTTLE = 100.0


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=60.0)), max_size=60))
def test_a_flapping_key_sends_at_most_one_alert_per_window_and_a_failure_is_never_left_silent(
    steps: list[tuple[bool, float]],
) -> None:
    book, now = AlertBook(), 0.0
    sent: list[tuple[float, str]] = []
    announced = False  # the current failure's alert went out
    for failing, dt in steps:
        now += dt
        quiet = all(now - t >= THROTTLE for t, _ in sent)
        action = book.observe("k", failing, now, THROTTLE)
        if action:
            book.sent("k", action, now)
            sent.append((now, action))
        if failing:
            # Liveness: a failing key is announced as soon as the throttle window allows, never later.
            assert action == ("alert" if not announced and quiet else None)
            announced = announced or action == "alert"
        else:
            assert action == ("recover" if announced else None)
            announced = False
    alerts = [t for t, a in sent if a == "alert"]
    assert all(b - a >= THROTTLE for a, b in itertools.pairwise(alerts))
    # Alerts and recoveries alternate, starting with an alert.
    kinds = [a for _, a in sent]
    assert all(k == ("alert" if i % 2 == 0 else "recover") for i, k in enumerate(kinds))


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=60.0), st.booleans()), max_size=60))
def test_a_message_that_was_not_delivered_stays_due_until_it_is(steps: list[tuple[bool, float, bool]]) -> None:
    """Each step: (failing, time passed, whether the channels delivered what was due)."""
    book, now = AlertBook(), 0.0
    seen: list[tuple[bool, str | None, bool]] = []
    delivered: list[tuple[float, str]] = []
    for failing, dt, ok in steps:
        now += dt
        action = book.observe("k", failing, now, THROTTLE)
        if action and ok:
            book.sent("k", action, now)
            delivered.append((now, action))
        seen.append((failing, action, ok))
    for (failing, action, ok), (failing_next, action_next, _) in itertools.pairwise(seen):
        if action and not ok and failing_next == failing:
            assert action_next == action  # not recorded as sent: due again on the next observation
    kinds = [a for _, a in delivered]
    assert all(k == ("alert" if i % 2 == 0 else "recover") for i, k in enumerate(kinds))
    alerts = [t for t, a in delivered if a == "alert"]
    assert all(b - a >= THROTTLE for a, b in itertools.pairwise(alerts))


def test_a_check_that_fails_again_soon_after_its_recovery_is_alerted_when_the_window_ends() -> None:
    book = AlertBook()

    def step(failing: bool, now: float) -> str | None:
        action = book.observe("check", failing, now, THROTTLE)
        if action:
            book.sent("check", action, now)
        return action

    assert step(True, 0.0) == "alert"
    assert step(False, 10.0) == "recover"
    assert step(True, 20.0) is None  # within the window of the recovery: held back...
    assert step(True, 60.0) is None
    assert step(True, 110.0) == "alert"  # ...and sent once the window ends, as it still fails
    assert step(True, 500.0) is None  # announced: nothing more while it keeps failing
    assert step(False, 510.0) == "recover"


def test_a_held_back_alert_says_how_many_failures_the_throttle_held_back() -> None:
    book = AlertBook()
    alert = Alert("check", "error", "Check x failed", "boom")
    assert book.update(alert, True, 0.0, THROTTLE) == alert
    book.mark_sent(alert, 0.0)
    recovery = book.update(alert, False, 10.0, THROTTLE)
    assert recovery is not None and recovery.severity == "recovery"
    book.mark_sent(recovery, 10.0)
    assert book.update(alert, True, 20.0, THROTTLE) is None
    late = book.update(alert, True, 120.0, THROTTLE)
    assert late is not None and late.fields["failures held back by the throttle"] == "1"


def test_an_alert_whose_delivery_failed_is_due_again_on_the_next_observation() -> None:
    book = AlertBook()
    assert book.observe("k", True, 0.0, THROTTLE) == "alert"  # the webhook was down: not recorded
    assert book.observe("k", True, 15.0, THROTTLE) == "alert"
    book.sent("k", "alert", 15.0)
    assert book.observe("k", True, 30.0, THROTTLE) is None


def test_the_book_survives_its_json_round_trip() -> None:
    book = AlertBook()
    assert book.observe("check", True, 10.0, THROTTLE) == "alert"
    book.sent("check", "alert", 10.0)
    again = AlertBook.from_json(json.loads(json.dumps(book.to_json())))
    assert again.observe("check", True, 20.0, THROTTLE) is None  # still failing: no second alert
    assert again.observe("check", False, 30.0, THROTTLE) == "recover"
    again.sent("check", "recover", 30.0)
    assert again.observe("check", True, 40.0, THROTTLE) is None  # flapped back within the window
    assert again.observe("check", False, 50.0, THROTTLE) is None  # its alert was held back: no recovery
    assert again.observe("check", True, 200.0, THROTTLE) == "alert"


def test_the_webhook_retries_a_failing_receiver_with_backoff_and_then_gives_up(receiver: Receiver) -> None:
    alert = Alert("connect:unreachable", "error", "Kafka Connect is unreachable", "3 ticks")
    channel = WebhookChannel(receiver.url, attempts=3, backoff_seconds=0.2)
    receiver.fail_with(503, times=2)
    t0 = time.monotonic()
    channel.send(alert)  # two refusals, then delivered
    assert len(receiver.attempts) == 3 and len(receiver.received) == 1
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff doubles
    receiver.fail_with(500)
    with pytest.raises(AlertDeliveryError) as info:
        channel.send(alert)
    assert len(receiver.attempts) == 6 and len(receiver.received) == 1  # bounded: three attempts
    assert "500" in str(info.value) and "hooks" not in str(info.value)
    receiver.fail_with(400)  # a refusal that a retry would not change
    with pytest.raises(AlertDeliveryError):
        channel.send(alert)
    assert len(receiver.attempts) == 7


def test_a_delivery_that_failed_is_not_recorded_and_the_next_tick_sends_it(receiver: Receiver) -> None:
    book, log = AlertBook(), logging.getLogger("alerts-test")
    alert = Alert("check:x", "error", "Check x failed", "boom")
    receiver.fail_with(503)
    for now in (0.0, 30.0):  # two ticks while the receiver is down
        dispatch = Dispatch([LogChannel(log), WebhookChannel(receiver.url, backoff_seconds=0.05)], log)
        message = book.update(alert, True, now, THROTTLE)
        assert message == alert and not dispatch.send(message)
        assert not dispatch.send(alert) and len(receiver.attempts) == 3 * (int(now) // 30 + 1)  # not retried twice
    receiver.heal()
    dispatch = Dispatch([LogChannel(log), WebhookChannel(receiver.url)], log)
    message = book.update(alert, True, 60.0, THROTTLE)
    assert message == alert and dispatch.send(message)
    book.mark_sent(message, 60.0)
    assert book.update(alert, True, 90.0, THROTTLE) is None
    assert receiver.texts() == [":red_circle: Check x failed"]


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
