"""Connector configs as code (`connectors/*.json`) and an idempotent deploy that reports what changed.

Configs refer to secrets as `${env:KNOWTON_...}`; the Connect worker resolves them from its own
environment (EnvVarConfigProvider), so no secret passes through this code, the REST API or the repo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from knowton_pipeline.lib.kafka_connect import KafkaConnectClient
from knowton_pipeline.lib.settings import PROJECT_ROOT

CONNECTORS_DIR = PROJECT_ROOT / "connectors"


class ConnectorConfigError(ValueError):
    """A connector file cannot be deployed as it is."""


def load_connector_configs(directory: Path = CONNECTORS_DIR) -> dict[str, dict[str, str]]:
    """Connector name -> config, from files shaped like Connect's `POST /connectors` body."""
    configs: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            body = json.loads(path.read_text())
        except ValueError as exc:
            raise ConnectorConfigError(f"{path.name} is not valid JSON: {exc}") from exc
        name, config = body.get("name"), body.get("config")
        if not isinstance(name, str) or not isinstance(config, dict):
            raise ConnectorConfigError(f"{path.name} must have a string 'name' and an object 'config'")
        if "connector.class" not in config:
            raise ConnectorConfigError(f"{path.name}: config has no connector.class")
        bad = [k for k, v in config.items() if not isinstance(v, str)]
        if bad:
            raise ConnectorConfigError(f"{path.name}: values must be strings, as Connect stores them: {', '.join(bad)}")
        for key, value in config.items():
            if "password" in key.lower() and not value.startswith("${"):
                raise ConnectorConfigError(
                    f"{path.name}: {key} holds a literal secret; refer to it as ${{env:KNOWTON_...}} instead"
                )
        configs[name] = {**config, "name": name}
    return configs


@dataclass(frozen=True)
class DeployResult:
    name: str
    action: str  # "created", "updated", "unchanged", and with dry_run "would create" / "would update"
    changed_keys: list[str] = field(default_factory=list)

    def describe(self) -> str:
        keys = f" ({', '.join(self.changed_keys)})" if self.changed_keys else ""
        return f"{self.name}: {self.action}{keys}"

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "action": self.action, "changed_keys": self.changed_keys}


def diff_config(deployed: dict[str, str], desired: dict[str, str]) -> list[str]:
    keys = set(deployed) | set(desired)
    return sorted(k for k in keys if deployed.get(k) != desired.get(k))


def deploy_connectors(
    client: KafkaConnectClient, configs: dict[str, dict[str, str]], *, dry_run: bool = False
) -> list[DeployResult]:
    results = []
    for name, desired in configs.items():
        deployed = client.config(name)
        if deployed is None:
            if not dry_run:
                client.put_config(name, desired)
            results.append(DeployResult(name, "would create" if dry_run else "created", sorted(desired)))
            continue
        changed = diff_config(deployed, desired)
        if not changed:
            results.append(DeployResult(name, "unchanged"))
            continue
        if not dry_run:
            client.put_config(name, desired)
        results.append(DeployResult(name, "would update" if dry_run else "updated", changed))
    return results
