"""Settings for the local stack and the stores, read from KNOWTON_* environment variables.

Every value has a working local default; a bad value fails fast with a message naming the variable.
Secrets are never printed: `Settings.describe()` masks them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The Dagster instance's config, linked into DAGSTER_HOME. Not at the repository root: `dg dev` runs there and
# warns that a dagster.yaml in its folder "will not be used" whenever DAGSTER_HOME is another folder.
DAGSTER_YAML = PROJECT_ROOT / "config" / "dagster.yaml"
# The largest Kafka record the pipeline carries: a change event holds its row twice (old and new image), so a row
# with a large text or jsonb value is a large record. Kafka's default (1 MB) failed the Debezium task on such a row
# and stopped CDC for every table. Connect's producer takes this much; the broker and the DLQ producer take a dead
# letter's headers more (`KAFKA_MAX_LETTER_BYTES`), so a record at the limit can still be dead-lettered.
KAFKA_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KAFKA_MAX_LETTER_BYTES = KAFKA_MAX_MESSAGE_BYTES + 1024 * 1024


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages, logs and metadata."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class SettingsError(ValueError):
    """A KNOWTON_* variable has a value that cannot work."""


@dataclass(frozen=True)
class _Spec:
    default: str | None
    kind: str  # "port", "int", "str", "path", "secret", "secret-url", "heap", "cron"
    help: str


# The one list of settings: name -> default, kind and what it is for.
SPECS: dict[str, _Spec] = {
    "KNOWTON_HOME": _Spec(None, "path", "folder for all stack state, logs, jars and secrets"),
    "KNOWTON_PG_HOST": _Spec("127.0.0.1", "str", "PostgreSQL host"),
    "KNOWTON_PG_PORT": _Spec("5432", "port", "PostgreSQL port"),
    "KNOWTON_PG_DB": _Spec("knowton", "str", "PostgreSQL database with the KnowTon tables"),
    "KNOWTON_PG_USER": _Spec("knowton", "str", "PostgreSQL owner role"),
    "KNOWTON_PG_PASSWORD": _Spec(None, "secret", "password of KNOWTON_PG_USER"),
    "KNOWTON_CDC_PASSWORD": _Spec(None, "secret", "password of the knowton_cdc role Debezium connects as"),
    "KNOWTON_DAGSTER_PG_DB": _Spec("dagster", "str", "PostgreSQL database of the Dagster instance"),
    "KNOWTON_KAFKA_PORT": _Spec("9092", "port", "Kafka broker port"),
    "KNOWTON_KAFKA_CONTROLLER_PORT": _Spec("9093", "port", "Kafka KRaft controller port"),
    "KNOWTON_CONNECT_PORT": _Spec("8083", "port", "Kafka Connect REST port"),
    "KNOWTON_ES_PORT": _Spec("9200", "port", "Elasticsearch HTTP port"),
    "KNOWTON_ES_TRANSPORT_PORT": _Spec("9300", "port", "Elasticsearch transport port"),
    "KNOWTON_CLICKHOUSE_DSN": _Spec(None, "str", "chdb:///path (embedded engine) or http(s)://server"),
    "KNOWTON_KAFKA_BOOTSTRAP": _Spec(None, "str", "Kafka bootstrap servers (default: the local broker)"),
    "KNOWTON_CONNECT_URL": _Spec(None, "str", "Kafka Connect REST URL (default: the local worker)"),
    "KNOWTON_ES_URL": _Spec(None, "str", "Elasticsearch URL (default: the local node)"),
    "KNOWTON_DAGSTER_PORT": _Spec("3000", "port", "Dagster UI port"),
    "KNOWTON_STACK_USER": _Spec(
        "knowton", "str", "unprivileged user that runs PostgreSQL and Elasticsearch when started as root"
    ),
    "KNOWTON_STACK_TIMEOUT": _Spec("240", "int", "seconds `knowton stack up` waits for every component"),
    "KNOWTON_KAFKA_HEAP": _Spec("512m", "heap", "Kafka broker JVM heap"),
    # Holds a transaction's large rows as they stream (benchmarks/large_transaction.py): 768m failed on 30 rows of
    # 20 MB in one transaction.
    "KNOWTON_CONNECT_HEAP": _Spec("2g", "heap", "Kafka Connect JVM heap"),
    "KNOWTON_ES_HEAP": _Spec("768m", "heap", "Elasticsearch JVM heap"),
    "KNOWTON_ALERT_WEBHOOK_URL": _Spec(
        None, "secret-url", "webhook that receives alerts as Slack-compatible JSON (unset: alerts go to the log only)"
    ),
    "KNOWTON_CDC_PARTITIONS": _Spec(
        "3", "int", "partitions of each cdc-* data topic: how many processes of one store's sink can share the work"
    ),
    "KNOWTON_ALERT_THROTTLE_SECONDS": _Spec("900", "int", "at most one alert per check or connector in this window"),
    "KNOWTON_RECONCILE_INCREMENTAL_CRON": _Spec(
        "5 * * * *", "cron", "when reconcile_hourly runs (incremental, repairing); read when the definitions load"
    ),
    "KNOWTON_RECONCILE_FULL_CRON": _Spec(
        "30 3 * * *", "cron", "when reconcile_daily runs (full, repairing); read when the definitions load"
    ),
}


def _check(name: str, raw: str) -> str:
    spec = SPECS[name]
    value = raw.strip()
    if spec.kind == "port":
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
            raise SettingsError(f"{name} must be a TCP port number between 1 and 65535, got {raw!r} ({spec.help})")
    elif spec.kind == "int":
        if not (value.isascii() and value.isdigit()) or int(value) <= 0:
            raise SettingsError(f"{name} must be a positive whole number, got {raw!r} ({spec.help})")
    elif spec.kind == "secret-url":
        if not value.startswith(("http://", "https://")):
            raise SettingsError(f"{name} must be an http:// or https:// URL ({spec.help})")
    elif spec.kind == "heap":
        if not (value.isascii() and value[:-1].isdigit() and value[-1].lower() in "mg"):
            raise SettingsError(f"{name} must be a JVM heap size such as 512m or 1g, got {raw!r} ({spec.help})")
    elif spec.kind == "cron":
        if len(value.split()) != 5:
            raise SettingsError(f"{name} must be a cron string of five fields such as '5 * * * *', got {raw!r}")
    elif not value:
        raise SettingsError(f"{name} must not be empty ({spec.help})")
    return value


def setting(name: str, environ: Mapping[str, str] | None = None) -> str:
    """One setting, checked, or its default: for values read while definitions load, where a stray or bad
    unrelated KNOWTON_* variable should not stop the whole code location."""
    env = os.environ if environ is None else environ
    default = SPECS[name].default
    if name in env:
        return _check(name, env[name])
    if default is None:
        raise SettingsError(f"{name} has no default and is not set ({SPECS[name].help})")
    return default


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with `Settings.from_env()`."""

    values: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in env if k.startswith("KNOWTON_") and k not in SPECS)
        if unknown:
            known = ", ".join(sorted(SPECS))
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known settings are: {known}")
        values: dict[str, str] = {}
        for name, spec in SPECS.items():
            if name in env:
                values[name] = _check(name, env[name])
            elif spec.default is not None:
                values[name] = spec.default
        home = Path(values.get("KNOWTON_HOME") or PROJECT_ROOT / ".knowton").resolve()
        values["KNOWTON_HOME"] = str(home)
        values.setdefault("KNOWTON_CLICKHOUSE_DSN", f"chdb://{home / 'clickhouse'}")
        values.setdefault("KNOWTON_KAFKA_BOOTSTRAP", f"127.0.0.1:{values['KNOWTON_KAFKA_PORT']}")
        values.setdefault("KNOWTON_CONNECT_URL", f"http://127.0.0.1:{values['KNOWTON_CONNECT_PORT']}")
        values.setdefault("KNOWTON_ES_URL", f"http://127.0.0.1:{values['KNOWTON_ES_PORT']}")
        dsn = values["KNOWTON_CLICKHOUSE_DSN"]
        if not dsn.startswith(("chdb://", "http://", "https://")):
            raise SettingsError(
                f"KNOWTON_CLICKHOUSE_DSN must start with chdb://, http:// or https://, got {redact_dsn(dsn)!r}"
            )
        ports = [(n, values[n]) for n, s in SPECS.items() if s.kind == "port"]
        seen: dict[str, str] = {}
        for n, p in ports:
            if p in seen:
                raise SettingsError(f"{n} and {seen[p]} are both set to port {p}; each component needs its own port")
            seen[p] = n
        return cls(values)

    # --- plain accessors -------------------------------------------------------------
    def __getitem__(self, name: str) -> str:
        return self.values[name]

    @property
    def home(self) -> Path:
        return Path(self.values["KNOWTON_HOME"])

    def port(self, name: str) -> int:
        return int(self.values[name])

    def secret(self, name: str) -> str:
        """The secret from the environment, else the one generated for the local stack."""
        if name in self.values:
            return self.values[name]
        path = self.home / "secrets" / name.lower()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    @property
    def pg_password(self) -> str:
        return self.secret("KNOWTON_PG_PASSWORD")

    @property
    def cdc_password(self) -> str:
        return self.secret("KNOWTON_CDC_PASSWORD")

    def pg_conninfo(
        self, dbname: str | None = None, *, user: str | None = None, password: str | None = None
    ) -> dict[str, object]:
        """Keyword arguments for `psycopg.connect`."""
        return {
            "host": self.values["KNOWTON_PG_HOST"],
            "port": self.port("KNOWTON_PG_PORT"),
            "dbname": dbname or self.values["KNOWTON_PG_DB"],
            "user": user or self.values["KNOWTON_PG_USER"],
            "password": password if password is not None else self.pg_password,
            "connect_timeout": 5,
        }

    @property
    def kafka_bootstrap(self) -> str:
        return self.values["KNOWTON_KAFKA_BOOTSTRAP"]

    @property
    def connect_url(self) -> str:
        return self.values["KNOWTON_CONNECT_URL"]

    @property
    def es_url(self) -> str:
        return self.values["KNOWTON_ES_URL"]

    @property
    def dagster_home(self) -> Path:
        """DAGSTER_HOME: a folder under the stack's home whose dagster.yaml links to the project's (DAGSTER_YAML)."""
        home = self.home / "dagster"
        link = home / "dagster.yaml"
        if not (link.is_symlink() and Path(os.readlink(link)) == DAGSTER_YAML):
            # A link made elsewhere, or to the file's earlier place, is replaced atomically.
            home.mkdir(parents=True, exist_ok=True)
            fresh = home / f".dagster.yaml.{os.getpid()}"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(DAGSTER_YAML)
            os.replace(fresh, link)
        return home

    @property
    def clickhouse_dsn(self) -> str:
        return self.values["KNOWTON_CLICKHOUSE_DSN"]

    def export_env(self, *, include_secrets: bool) -> dict[str, str]:
        """Every setting as environment variables (what Dagster's EnvVar and dagster.yaml read)."""
        env = dict(self.values)
        if include_secrets:
            env["KNOWTON_PG_PASSWORD"] = self.pg_password
            env["KNOWTON_CDC_PASSWORD"] = self.cdc_password
        return env

    def describe(self) -> dict[str, str]:
        """Settings for display: secrets masked."""
        shown = {k: v for k, v in self.values.items() if SPECS[k].kind not in ("secret", "secret-url")}
        for name in ("KNOWTON_CLICKHOUSE_DSN", "KNOWTON_ES_URL", "KNOWTON_CONNECT_URL"):
            shown[name] = redact_dsn(shown[name])
        for name, spec in SPECS.items():
            if spec.kind == "secret" or (spec.kind == "secret-url" and name in self.values):
                shown[name] = "********"
        return shown
