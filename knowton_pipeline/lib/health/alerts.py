"""Alerts: what goes out when a check fails or a connector stays broken, deduplicated and throttled.

Each alert has a key (one check, one connector, Connect itself). The state of every key lives in a
sensor's cursor as plain JSON, so it survives daemon restarts:
- a key that starts failing sends one alert, unless the same key already sent a message within the
  throttle window (a flapping check then sends at most one alert and one recovery per window);
- a key that keeps failing sends nothing more;
- a key whose alert went out and that passes again sends one recovery.
Channels: a webhook taking Slack-compatible JSON, and the log. The webhook URL is a secret: it is never
logged, and a delivery failure is reported without it.
"""

from __future__ import annotations

import logging
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

    def __init__(self, url: str, *, timeout: float = 5.0):
        self._url = url
        self.timeout = timeout

    def __repr__(self) -> str:  # never show the URL: it usually embeds a token
        return "WebhookChannel(url=********)"

    def send(self, alert: Alert) -> None:
        try:
            r = requests.post(self._url, json=alert.slack_payload(), timeout=self.timeout)
        except requests.RequestException as exc:
            raise AlertDeliveryError(f"alert webhook unreachable: {type(exc).__name__}") from None
        if r.status_code >= 300:
            raise AlertDeliveryError(f"alert webhook answered HTTP {r.status_code}")


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

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> AlertBook:
        return cls({k: dict(v) for k, v in (data or {}).items()})

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.keys.items() if v.get("failing") or v.get("last_sent") is not None}

    def observe(
        self, key: str, failing: bool, now: float, throttle_seconds: float
    ) -> Literal["alert", "recover"] | None:
        """Record the key's state at `now`; say whether an alert or a recovery should go out."""
        entry = self.keys.setdefault(key, {"failing": False, "alerted": False, "last_sent": None, "suppressed": 0})
        if failing and not entry["failing"]:
            entry["failing"] = True
            if entry["last_sent"] is None or now - entry["last_sent"] >= throttle_seconds:
                entry["alerted"], entry["last_sent"] = True, now
                return "alert"
            entry["alerted"] = False
            entry["suppressed"] += 1
            return None
        if not failing and entry["failing"]:
            entry["failing"] = False
            if entry["alerted"]:
                entry["alerted"], entry["last_sent"] = False, now
                return "recover"
        return None

    def update(
        self, alert: Alert, failing: bool, now: float, throttle_seconds: float, recovery: Alert | None = None
    ) -> Alert | None:
        """What to send for `alert.key` now: the alert, its recovery (by default "Recovered: <title>"), or nothing."""
        action = self.observe(alert.key, failing, now, throttle_seconds)
        if action == "alert":
            return alert
        if action == "recover":
            return recovery or Alert(alert.key, "recovery", f"Recovered: {alert.title}", "It is healthy again.")
        return None


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


def channels_from_settings(webhook_url: str | None, logger: Any) -> list[AlertChannel]:
    out: list[AlertChannel] = [LogChannel(logger)]
    if webhook_url:
        out.append(WebhookChannel(webhook_url))
    return out
