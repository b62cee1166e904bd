"""A small client for the Kafka Connect REST API (what operators used to do with curl)."""

from __future__ import annotations

from typing import Any

import requests


class KafkaConnectError(RuntimeError):
    """Kafka Connect is unreachable or refused a request."""


class KafkaConnectClient:
    def __init__(self, base_url: str, *, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            r = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise KafkaConnectError(f"Kafka Connect at {self.base_url} is unreachable: {type(exc).__name__}") from exc
        if r.status_code >= 400 and r.status_code != 404:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise KafkaConnectError(f"{method} {path} failed with HTTP {r.status_code}: {message}")
        return r

    def connectors_with_status(self) -> dict[str, Any]:
        """`GET /connectors?expand=status&expand=info`: every connector with its state and tasks."""
        return self._request("GET", "/connectors", params=[("expand", "status"), ("expand", "info")]).json()

    def config(self, name: str) -> dict[str, str] | None:
        r = self._request("GET", f"/connectors/{name}/config")
        return None if r.status_code == 404 else r.json()

    def status(self, name: str) -> dict[str, Any] | None:
        r = self._request("GET", f"/connectors/{name}/status")
        return None if r.status_code == 404 else r.json()

    def put_config(self, name: str, config: dict[str, str]) -> dict[str, Any]:
        """Create or update (`PUT /connectors/{name}/config` is idempotent)."""
        return self._request("PUT", f"/connectors/{name}/config", json=config).json()

    def restart(self, name: str, *, include_tasks: bool = True, only_failed: bool = True) -> int:
        r = self._request(
            "POST",
            f"/connectors/{name}/restart",
            params={"includeTasks": str(include_tasks).lower(), "onlyFailed": str(only_failed).lower()},
        )
        return r.status_code

    def delete(self, name: str) -> bool:
        return self._request("DELETE", f"/connectors/{name}").status_code != 404

    def stop(self, name: str) -> None:
        """`PUT /connectors/{name}/stop`: its tasks shut down, its config and offsets stay."""
        self._request("PUT", f"/connectors/{name}/stop")

    def resume(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/resume")

    def offsets(self, name: str) -> list[dict[str, Any]]:
        r = self._request("GET", f"/connectors/{name}/offsets")
        return [] if r.status_code == 404 else r.json().get("offsets", [])

    def reset_offsets(self, name: str) -> None:
        """`DELETE /connectors/{name}/offsets` (the connector must be STOPPED): it starts afresh next time."""
        self._request("DELETE", f"/connectors/{name}/offsets")
