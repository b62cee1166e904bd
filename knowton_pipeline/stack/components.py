"""The stack's components: how each is laid out on disk, started, probed for health and stopped."""

from __future__ import annotations

import base64
import glob
import os
import shutil
import signal
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests

from knowton_pipeline.lib.settings import KAFKA_MAX_LETTER_BYTES, KAFKA_MAX_MESSAGE_BYTES, Settings

KAFKA_VERSION = "4.3.1"
ELASTICSEARCH_VERSION = "8.19.21"
DEBEZIUM_CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
# The largest temporary direct buffer a JVM of the stack keeps per thread (jdk.nio.maxCachedBufferSize).
NIO_CACHED_BUFFER_BYTES = 256 * 1024


class StackError(RuntimeError):
    """The stack cannot start or be reached; the message says what to fix."""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_java() -> tuple[Path, int]:
    """The java binary (JAVA_HOME first, then PATH) and its major version; Java 17+ is required."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    if candidate is None or not candidate.exists():
        found = shutil.which("java")
        candidate = Path(found) if found else None
    if candidate is None:
        where = f"JAVA_HOME={java_home} has no bin/java and " if java_home else ""
        raise StackError(
            f"Java 17 or newer is needed for Kafka, Kafka Connect and Elasticsearch, but {where}no `java` is on PATH. "
            "Install it (Debian: apt-get install openjdk-17-jdk-headless) or set JAVA_HOME."
        )
    try:
        out = subprocess.run([str(candidate), "-version"], capture_output=True, text=True, timeout=30).stderr
    except OSError as exc:
        raise StackError(f"{candidate} cannot be run ({exc}); install Java 17+ or fix JAVA_HOME") from exc
    version = out.split('"')[1] if '"' in out else "0"
    major = int(version.split(".")[0] if not version.startswith("1.") else version.split(".")[1])
    if major < 17:
        raise StackError(f"{candidate} is Java {version}; Java 17 or newer is needed (set JAVA_HOME to one)")
    return candidate, major


def find_postgres_bindir() -> Path:
    """The folder with `initdb` and `postgres`: pg_config's, the newest Debian one, or PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out:
            candidates.append(Path(out))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in debian]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for c in candidates:
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    raise StackError(
        "PostgreSQL server binaries (initdb, postgres) were not found. "
        "Install them (Debian: apt-get install postgresql) and run again."
    )


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64, never starting with "-" (the storage tool
    would take it for an option; it does about one time in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class Component:
    """One server process of the stack."""

    name: str = ""
    port_settings: tuple[str, ...] = ()
    needs_java = False
    runs_unprivileged = False  # PostgreSQL and Elasticsearch refuse to run as root
    stop_signal = signal.SIGTERM
    depends_on: tuple[str, ...] = ()
    is_sink = False  # a sink of this project rather than a server it runs

    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.home
        self.dir = self.home / self.name
        self.log = self.home / "logs" / f"{self.name}.log"
        self.dist = self.home / "dist"

    def ports(self) -> dict[str, int]:
        return {s: self.settings.port(s) for s in self.port_settings}

    def address(self) -> str:
        raise NotImplementedError

    def prepare(self, user: str | None) -> None:
        """Lay out config and data folders (idempotent)."""

    def command(self, java: Path | None) -> list[str]:
        raise NotImplementedError

    def environment(self, java: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KNOWTON_")}
        return env

    def health(self) -> Health:
        raise NotImplementedError


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    shutil.chown(path, user, user)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            shutil.chown(os.path.join(root, n), user, user)


class Postgres(Component):
    name = "postgres"
    port_settings = ("KNOWTON_PG_PORT",)
    runs_unprivileged = True
    stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients to disconnect

    def address(self) -> str:
        s = self.settings
        return f"postgresql://{s['KNOWTON_PG_USER']}@127.0.0.1:{s['KNOWTON_PG_PORT']}/{s['KNOWTON_PG_DB']}"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def prepare(self, user: str | None) -> None:
        bindir = find_postgres_bindir()
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        _chown_tree(self.dir, user)
        if (self.data / "PG_VERSION").exists():
            return
        pwfile = self.dir / "run" / "initdb.pw"
        pwfile.write_text(self.settings.pg_password + "\n")
        pwfile.chmod(0o600)
        if user:
            shutil.chown(pwfile, user, user)
        ids = None
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            ids = (entry.pw_uid, entry.pw_gid)
        try:
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.settings["KNOWTON_PG_USER"],
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                capture_output=True,
                text=True,
                cwd=self.dir,
                user=ids[0] if ids else None,
                group=ids[1] if ids else None,
                extra_groups=[] if ids else None,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log.write_text(result.stdout + result.stderr)
            shutil.rmtree(self.data, ignore_errors=True)
            raise StackError(f"postgres: initdb failed (see {self.log}): {result.stderr.strip()[-400:]}")

    def command(self, java: Path | None) -> list[str]:
        bindir = find_postgres_bindir()
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": self.settings["KNOWTON_PG_PORT"],
            # TCP only: everything connects to 127.0.0.1, and a socket path under a deep stack home can exceed
            # the 107 bytes a Unix-domain socket path may have, which stops PostgreSQL from starting at all.
            "unix_socket_directories": "",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "logging_collector": "off",
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data)]
        for k, v in opts.items():
            argv += ["-c", f"{k}={v}"]
        return argv

    def health(self) -> Health:
        try:
            with psycopg.connect(**self.settings.pg_conninfo("postgres")) as conn:  # type: ignore[arg-type]
                wal = conn.execute("SHOW wal_level").fetchone()
        except psycopg.Error as exc:
            return Health(False, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return Health(True, f"wal_level={wal[0] if wal else '?'}")

    def bootstrap(self) -> None:
        """Create the application and Dagster databases once the server answers."""
        with psycopg.connect(**self.settings.pg_conninfo("postgres"), autocommit=True) as conn:  # type: ignore[arg-type]
            for db in (self.settings["KNOWTON_PG_DB"], self.settings["KNOWTON_DAGSTER_PG_DB"]):
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone()
                if not exists:
                    conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(db)))


_KAFKA_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
logger.zookeeper.name = org.apache.zookeeper
logger.zookeeper.level = WARN
"""


def _write_properties(path: Path, props: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


class Kafka(Component):
    name = "kafka"
    port_settings = ("KNOWTON_KAFKA_PORT", "KNOWTON_KAFKA_CONTROLLER_PORT")
    needs_java = True

    @property
    def libs(self) -> Path:
        return self.dist / f"kafka-{KAFKA_VERSION}" / "libs"

    def address(self) -> str:
        return self.settings.kafka_bootstrap

    def prepare(self, user: str | None) -> None:
        port, cport = self.settings["KNOWTON_KAFKA_PORT"], self.settings["KNOWTON_KAFKA_CONTROLLER_PORT"]
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
            "message.max.bytes": str(KAFKA_MAX_LETTER_BYTES),  # every topic's limit, unless it sets its own
        }
        _write_properties(self.dir / "server.properties", props)
        (self.dir / "log4j2.properties").write_text(_KAFKA_LOG4J)
        if (self.dir / "data" / "meta.properties").exists():
            return
        java, _ = find_java()
        cluster_id = new_cluster_id()
        result = subprocess.run(
            [
                str(java),
                "-cp",
                f"{self.libs}/*",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(self.dir / "server.properties"),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"kafka: formatting the KRaft storage failed: {(result.stdout + result.stderr)[-600:]}")

    def command(self, java: Path | None) -> list[str]:
        heap = self.settings["KNOWTON_KAFKA_HEAP"]
        return [
            str(java),
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            # A large record is written to the log through a temporary direct buffer as large as it; the JDK keeps one
            # per thread by default, and a few of them exhaust direct memory (as large as the heap) on the first
            # batch of large rows. Larger ones are freed after use.
            f"-Djdk.nio.maxCachedBufferSize={NIO_CACHED_BUFFER_BYTES}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(self.dir / "server.properties"),
        ]

    def health(self) -> Health:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap, "log_level": 0})
        try:
            meta = admin.list_topics(timeout=3)
        except Exception as exc:  # the client raises KafkaException with a transport error inside
            return Health(False, str(exc))
        if not meta.brokers:
            return Health(False, "no broker in metadata yet")
        return Health(True, f"{len(meta.brokers)} broker, {len(meta.topics)} topics")


class Connect(Component):
    name = "connect"
    port_settings = ("KNOWTON_CONNECT_PORT",)
    needs_java = True
    depends_on = ("kafka",)

    def address(self) -> str:
        return self.settings.connect_url

    @property
    def plugins(self) -> Path:
        return self.dist / "connect-plugins"

    def prepare(self, user: str | None) -> None:
        port = self.settings["KNOWTON_CONNECT_PORT"]
        props = {
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": "knowton-connect",
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "false",
            "value.converter.schemas.enable": "false",
            "config.storage.topic": "knowton-connect-configs",
            "offset.storage.topic": "knowton-connect-offsets",
            "status.storage.topic": "knowton-connect-status",
            "config.storage.replication.factor": "1",
            "offset.storage.replication.factor": "1",
            "offset.storage.partitions": "5",
            "status.storage.replication.factor": "1",
            "status.storage.partitions": "1",
            "offset.flush.interval.ms": "1000",
            # A change event of a row with a large value is sent whole (the broker takes as much); the buffer holds
            # at least one such record.
            "producer.max.request.size": str(KAFKA_MAX_MESSAGE_BYTES),
            "producer.buffer.memory": str(2 * KAFKA_MAX_MESSAGE_BYTES),
            "listeners": f"http://127.0.0.1:{port}",
            "rest.advertised.host.name": "127.0.0.1",
            "rest.advertised.port": port,
            "plugin.path": str(self.plugins),
            # Connector configs refer to ${env:KNOWTON_*}: secrets stay in the worker's environment,
            # never in the REST API, the config topic or this repository.
            "config.providers": "env",
            "config.providers.env.class": "org.apache.kafka.common.config.provider.EnvVarConfigProvider",
            "config.providers.env.param.allowlist.pattern": "^KNOWTON_.*$",
        }
        _write_properties(self.dir / "connect-distributed.properties", props)
        (self.dir / "log4j2.properties").write_text(_KAFKA_LOG4J)

    def command(self, java: Path | None) -> list[str]:
        heap = self.settings["KNOWTON_CONNECT_HEAP"]
        libs = self.dist / f"kafka-{KAFKA_VERSION}" / "libs"
        return [
            str(java),
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            f"-Djdk.nio.maxCachedBufferSize={NIO_CACHED_BUFFER_BYTES}",  # as the broker's (above)
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(self.dir / "connect-distributed.properties"),
        ]

    def environment(self, java: Path | None) -> dict[str, str]:
        env = super().environment(java)
        env.update(self.settings.export_env(include_secrets=True))
        return env

    def health(self) -> Health:
        try:
            r = requests.get(f"{self.settings.connect_url}/connector-plugins", timeout=3)
            r.raise_for_status()
        except requests.RequestException as exc:
            return Health(False, type(exc).__name__)
        classes = {p.get("class") for p in r.json()}
        if DEBEZIUM_CONNECTOR_CLASS not in classes:
            return Health(False, f"Debezium PostgreSQL connector not in plugin path {self.plugins}")
        return Health(True, "Debezium PostgreSQL connector loaded")


class Elasticsearch(Component):
    name = "elasticsearch"
    port_settings = ("KNOWTON_ES_PORT", "KNOWTON_ES_TRANSPORT_PORT")
    needs_java = True
    runs_unprivileged = True

    @property
    def distribution(self) -> Path:
        return self.dist / f"elasticsearch-{ELASTICSEARCH_VERSION}"

    def address(self) -> str:
        return self.settings.es_url

    def prepare(self, user: str | None) -> None:
        config = self.dir / "config"
        if not config.exists():
            shutil.copytree(self.distribution / "config", config)
        for sub in ("data", "logs", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (config / "elasticsearch.yml").write_text(
            "\n".join(
                [
                    "cluster.name: knowton",
                    "node.name: knowton-es",
                    f"path.data: {self.dir / 'data'}",
                    f"path.logs: {self.dir / 'logs'}",
                    "network.host: 127.0.0.1",
                    f"http.port: {self.settings['KNOWTON_ES_PORT']}",
                    f"transport.port: {self.settings['KNOWTON_ES_TRANSPORT_PORT']}",
                    "discovery.type: single-node",
                    "xpack.security.enabled: false",
                    # A nearly full developer disk must not turn indices read-only mid-test.
                    "cluster.routing.allocation.disk.threshold_enabled: false",
                    "",
                ]
            )
        )
        heap = self.settings["KNOWTON_ES_HEAP"]
        (config / "jvm.options.d").mkdir(exist_ok=True)
        (config / "jvm.options.d" / "knowton-heap.options").write_text(f"-Xms{heap}\n-Xmx{heap}\n")
        _chown_tree(self.dir, user)

    def command(self, java: Path | None) -> list[str]:
        return [str(self.distribution / "bin" / "elasticsearch")]

    def environment(self, java: Path | None) -> dict[str, str]:
        env = super().environment(java)
        assert java is not None
        env.update(
            {
                "ES_JAVA_HOME": str(java.resolve().parent.parent),
                "ES_PATH_CONF": str(self.dir / "config"),
                "ES_TMPDIR": str(self.dir / "tmp"),
                "HOME": str(self.dir),
            }
        )
        env.pop("JAVA_HOME", None)
        return env

    def health(self) -> Health:
        try:
            r = requests.get(f"{self.settings.es_url}/_cluster/health", timeout=3)
            r.raise_for_status()
        except requests.RequestException as exc:
            return Health(False, type(exc).__name__)
        status = r.json().get("status")
        return Health(status in ("green", "yellow"), f"cluster {status}")


class SearchSink(Component):
    """The Elasticsearch sink as a service (`knowton sink run --store elasticsearch --supervise`): it applies changes
    as they arrive, so search stays seconds behind PostgreSQL. A Python process, not a server: its health is the
    status it keeps writing. It never opens ClickHouse, so it and Dagster's runs never wait for each other."""

    name = "sink-elasticsearch"
    store = "elasticsearch"
    depends_on = ("postgres", "kafka", "elasticsearch")
    is_sink = True

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    def address(self) -> str:
        return f"consumer group knowton-sink-{self.store}"

    def prepare(self, user: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status_path.unlink(missing_ok=True)  # health is judged on what this start reports

    def command(self, java: Path | None) -> list[str]:
        from knowton_pipeline.lib.sync.service import service_argv

        return service_argv(self.store, self.status_path, "--supervise")

    def environment(self, java: Path | None) -> dict[str, str]:
        env = super().environment(java)
        env.update(self.settings.export_env(include_secrets=True))
        env.pop("KNOWTON_CDC_PASSWORD", None)  # Debezium's, not the sink's
        env["PYTHONUNBUFFERED"] = "1"  # its log is read while it runs
        return env

    def health(self) -> Health:
        from knowton_pipeline.lib.sync.service import SinkStatus

        status = SinkStatus.load(self.status_path)
        if status is None:
            return Health(False, "no status reported yet")
        # Up and reporting is healthy for the stack, even while it waits out a store or the schema.
        return Health(status.alive(), status.describe())


COMPONENTS: tuple[type[Component], ...] = (Postgres, Kafka, Connect, Elasticsearch, SearchSink)
SERVERS = tuple(c.name for c in COMPONENTS if not c.is_sink)  # what tests start: they drive the sinks themselves
