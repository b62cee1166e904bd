"""The tests' own stack home and ports, so running the tests never touches the demo's stack or its data.
`python -m knowton_pipeline_tests.stack_home` prints them as `export` lines (scripts/test.sh evaluates them)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from knowton_pipeline.lib.settings import PROJECT_ROOT, SPECS

DEMO_HOME = PROJECT_ROOT / ".knowton"
TEST_HOME = DEMO_HOME / "test"
# Every component's default port plus 10000: the test stack runs beside the demo's (5432 -> 15432, ...).
TEST_PORTS = {name: str(int(spec.default or 0) + 10000) for name, spec in SPECS.items() if spec.kind == "port"}


class StackHomeError(RuntimeError):
    """The environment would point the tests at the demo's stack."""


def isolated_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The KNOWTON_* variables to add to `environ` for a test run.

    KNOWTON_HOME unset (or the test home): the test home with the test ports, keeping a port set in `environ`.
    Another KNOWTON_HOME is used as given. The demo's home raises StackHomeError, and so does an address that
    would lead the test home's clients to another stack."""
    home = Path(environ.get("KNOWTON_HOME", "").strip() or TEST_HOME).resolve()
    unset_hint = (
        'Unset the KNOWTON_* variables (a shell that ran `eval "$(knowton env)"` exported them: '
        f"`unset ${{!KNOWTON_@}}`) to use the test home {TEST_HOME.relative_to(PROJECT_ROOT)} on ports 15432, "
        "19092, ..., or set KNOWTON_HOME to another folder."
    )
    if home == DEMO_HOME.resolve():
        raise StackHomeError(
            f"KNOWTON_HOME is the demo's stack home ({home}); the tests run on a stack of their own and never "
            f"touch the demo's data. {unset_hint}"
        )
    if home != TEST_HOME.resolve():
        return {}
    env = {"KNOWTON_HOME": str(TEST_HOME), **{k: v for k, v in TEST_PORTS.items() if k not in environ}}
    ports = {**environ, **env}
    derived = {
        "KNOWTON_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['KNOWTON_KAFKA_PORT']}",
        "KNOWTON_CONNECT_URL": f"http://127.0.0.1:{ports['KNOWTON_CONNECT_PORT']}",
        "KNOWTON_ES_URL": f"http://127.0.0.1:{ports['KNOWTON_ES_PORT']}",
        "KNOWTON_CLICKHOUSE_DSN": f"chdb://{TEST_HOME / 'clickhouse'}",
    }
    stray = [name for name, value in derived.items() if environ.get(name, value) != value]
    if stray:
        raise StackHomeError(
            f"{', '.join(stray)} point(s) away from the test stack (the test home derives them from its ports). "
            + unset_hint
        )
    return env


def prepare_home(home: Path) -> None:
    """Create the test home with its `dist` linked to the demo home's, so the jars are downloaded once.

    Any other home is left as it is: the stack lays it out (and downloads its jars) by itself."""
    if home.resolve() != TEST_HOME.resolve():
        return
    shared = DEMO_HOME / "dist"
    shared.mkdir(parents=True, exist_ok=True)
    TEST_HOME.mkdir(exist_ok=True)
    link = TEST_HOME / "dist"
    if not link.is_symlink() and not link.exists():
        link.symlink_to(Path("..") / "dist", target_is_directory=True)


def main() -> int:
    try:
        env = isolated_env(os.environ)
    except StackHomeError as exc:
        print(f"tests: {exc}", file=sys.stderr)
        return 2
    prepare_home(Path(env.get("KNOWTON_HOME") or os.environ["KNOWTON_HOME"]))
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
