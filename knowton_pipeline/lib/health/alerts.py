"""Alerts: what goes out when a check fails or a connector stays broken, deduplicated and throttled.

Each alert has a key (one check, one connector, Connect itself). The state of every key lives in a
sensor's cursor as plain JSON, so it survives daemon restarts:
- a failing key sends one alert as soon as no message for that key went out within the throttle
  window: at once when it starts failing after a quiet window, otherwise when the window ends, if it
  is still failing then (a flapping check sends at most one alert per window, and a failure never
  stays silent for longer than one window);
- a key that keeps failing sends nothing more once its alert went out;
- a key whose alert went out and that passes again sends one recovery.
A message counts as sent only once every channel delivered it; until then it is due again on the next
observation. The webhook is retried a few times with backoff before a delivery counts as failed.
Channels: a webhook taking Slack-compatible JSON, and the log. The webhook URL is a secret: it is never
logged, and a delivery failure is reported without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import requests

Severity = Literal["error", "warning", "recovery"]
COLORS = {"error": "#d0021b", "warning": "#f5a623", "recovery": "#2eb67d"}


@dataclass(frozen=True)
class Alert:
    key: str
    severity: Severity
    title: str
    text: str
    fields: Mapping[str, str] = field(default_factory=dict)

    def slack_payload(self) -> dict[str, Any]:
        """Slack's incoming-webhook shape (also accepted by Mattermost, Rocket.Chat, Teams connectors)."""
        icon = {"error": ":red_circle:", "warning": ":warning:", "recovery": ":large_green_circle:"}[self.severity]
        return {
            "text": f"{icon} {self.title}",
            "attachments": [
                {
                    "color": COLORS[self.severity],
                    "title": self.title,
                    "text": self.text,
                    "fields": [{"title": k, "value": v, "short": len(v) < 40} for k, v in self.fields.items()],
                    "footer": "knowton-pipeline",
                }
            ],
        }


class AlertChannel(Protocol):
    name: str

    def send(self, alert: Alert) -> None: ...


class AlertDeliveryError(RuntimeError):
    """A channel could not deliver an alert (the message never includes the webhook URL)."""


class WebhookChannel:
    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff_seconds: float = 0.5,
    ):
        self._url = url
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds

    def __repr__(self) -> str:  # never show the URL: it usually embeds a token
        return "WebhookChannel(url=********)"

    def _post_once(self, alert: Alert) -> tuple[str, bool]:
        """(what went wrong, whether trying again may help); ("", False) once delivered."""
        try:
            r = requests.post(self._url, json=alert.slack_payload(), timeout=self.timeout)
        except requests.RequestException as exc:
            return f"alert webhook unreachable: {type(exc).__name__}", True
        if r.status_code < 300:
            return "", False
        # 429 and 5xx are the receiver's passing trouble; any other answer will not change on a retry.
        return f"alert webhook answered HTTP {r.status_code}", r.status_code == 429 or r.status_code >= 500

    def send(self, alert: Alert) -> None:
        """Post the alert; retried (bounded, exponential backoff) while the failure may pass."""
        for attempt in range(1, self.attempts + 1):
            error, retryable = self._post_once(alert)
            if not error:
                return
            if not retryable or attempt == self.attempts:
                raise AlertDeliveryError(f"{error} (attempt {attempt} of {self.attempts})")
            time.sleep(self.backoff_seconds * 2 ** (attempt - 1))


class LogChannel:
    name = "log"

    def __init__(self, logger: logging.Logger | Any):
        self.logger = logger

    def send(self, alert: Alert) -> None:
        details = "; ".join(f"{k}={v}" for k, v in alert.fields.items())
        line = f"ALERT [{alert.severity}] {alert.title}: {alert.text}" + (f" ({details})" if details else "")
        (self.logger.info if alert.severity == "recovery" else self.logger.error)(line)


@dataclass
class AlertBook:
    """Per-key alert state, kept as JSON in a sensor cursor."""

    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    # key -> {"failing": bool, "alerted": bool, "last_sent": float | None, "suppressed": int}
    # "alerted": the current failure's alert went out and its recovery has not yet.

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> AlertBook:
        return cls({k: dict(v) for k, v in (data or {}).items()})

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.keys.items() if v.get("failing") or v.get("last_sent") is not None}

    def observe(
        self, key: str, failing: bool, now: float, throttle_seconds: float
    ) -> Literal["alert", "recover"] | None:
        """Record the key's state at `now`; say whether an alert or a recovery is due.

        Nothing is recorded as sent here: call `sent` once the message went out, or it stays due.
        """
        entry = self.keys.setdefault(key, {"failing": False, "alerted": False, "last_sent": None, "suppressed": 0})
        quiet = entry["last_sent"] is None or now - entry["last_sent"] >= throttle_seconds
        starts = failing and not entry["failing"]
        entry["failing"] = failing
        if failing and not entry["alerted"]:
            if quiet:
                return "alert"
            if starts:  # held back by the throttle: alerted when the window ends if it still fails
                entry["suppressed"] += 1
            return None
        if not failing and entry["alerted"]:
            return "recover"
        return None

    def sent(self, key: str, action: Literal["alert", "recover"], now: float) -> None:
        """Record that the alert or recovery `observe` said was due went out at `now`."""
        entry = self.keys[key]
        entry["alerted"], entry["last_sent"] = action == "alert", now
        if action == "alert":
            entry["suppressed"] = 0

    def update(
        self, alert: Alert, failing: bool, now: float, throttle_seconds: float, recovery: Alert | None = None
    ) -> Alert | None:
        """The message due for `alert.key` now: the alert, its recovery (by default "Recovered: <title>"), or
        nothing. Pass it to `sent` once delivered."""
        action = self.observe(alert.key, failing, now, throttle_seconds)
        if action == "alert":
            held = self.keys[alert.key]["suppressed"]
            if held:
                fields = {**alert.fields, "failures held back by the throttle": str(held)}
                return Alert(alert.key, alert.severity, alert.title, alert.text, fields)
            return alert
        if action == "recover":
            return recovery or Alert(alert.key, "recovery", f"Recovered: {alert.title}", "It is healthy again.")
        return None

    def mark_sent(self, message: Alert, now: float) -> None:
        """`sent` for a message `update` returned."""
        self.sent(message.key, "recover" if message.severity == "recovery" else "alert", now)

    def forget(self, key: str) -> None:
        self.keys.pop(key, None)


def deliver(channels: Sequence[AlertChannel], alert: Alert, log: Any) -> list[str]:
    """Send to every channel; a failing channel is logged and does not stop the others. Returns the failures."""
    failures = []
    for channel in channels:
        try:
            channel.send(alert)
        except AlertDeliveryError as exc:
            failures.append(f"{channel.name}: {exc}")
            log.warning(f"could not deliver alert {alert.key!r} via {channel.name}: {exc}")
    return failures


class Dispatch:
    """One tick's deliveries. A channel that failed (after its own retries) is not tried again within the
    tick, so a webhook that is down cannot hold a sensor past its timeout; what it missed is not recorded
    as sent, so the next tick tries again."""

    def __init__(self, channels: Sequence[AlertChannel], log: Any):
        self.channels = list(channels)
        self.log = log
        self.down: set[str] = set()

    def send(self, alert: Alert) -> bool:
        """True when every channel delivered `alert`."""
        delivered = True
        for channel in self.channels:
            if channel.name in self.down:
                delivered = False
                self.log.warning(f"alert {alert.key!r} not sent via {channel.name}: it already failed this tick")
                continue
            try:
                channel.send(alert)
            except AlertDeliveryError as exc:
                delivered = False
                self.down.add(channel.name)
                self.log.warning(f"could not deliver alert {alert.key!r} via {channel.name}: {exc}")
        return delivered


def channels_from_settings(webhook_url: str | None, logger: Any) -> list[AlertChannel]:
    out: list[AlertChannel] = [LogChannel(logger)]
    if webhook_url:
        out.append(WebhookChannel(webhook_url))
    return out
