"""Settings: working defaults, clear errors for bad values, secrets never shown."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knowton_pipeline.lib.settings import SPECS, Settings, SettingsError, redact_dsn, setting


def test_defaults_work_without_any_variable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings.from_env({"KNOWTON_HOME": str(tmp_path)})
    assert s.port("KNOWTON_PG_PORT") == 5432
    assert s.connect_url == "http://127.0.0.1:8083"
    assert s.clickhouse_dsn == f"chdb://{tmp_path / 'clickhouse'}"


@given(
    st.text(min_size=1).filter(
        lambda v: not (v.strip().isascii() and v.strip().isdigit() and 1 <= int(v.strip()) <= 65535)
    )
)
def test_any_non_port_value_is_refused_naming_variable_and_value(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"KNOWTON_ES_PORT": value})
    assert "KNOWTON_ES_PORT" in str(err.value)


OTHER_DEFAULT_PORTS = {int(s.default) for n, s in SPECS.items() if s.kind == "port" and n != "KNOWTON_PG_PORT"}


@given(st.integers(min_value=1, max_value=65535).filter(lambda p: p not in OTHER_DEFAULT_PORTS))
def test_any_valid_port_is_accepted(port: int) -> None:
    s = Settings.from_env({"KNOWTON_PG_PORT": f" {port}"})
    assert s.port("KNOWTON_PG_PORT") == port


def test_two_components_on_one_port_are_refused() -> None:
    with pytest.raises(SettingsError, match=r"KNOWTON_ES_PORT and KNOWTON_PG_PORT|KNOWTON_PG_PORT and KNOWTON_ES_PORT"):
        Settings.from_env({"KNOWTON_ES_PORT": "5432"})


def test_unknown_knowton_variable_is_a_typo_error_listing_the_known_ones() -> None:
    with pytest.raises(SettingsError, match=r"KNOWTON_CONECT_PORT.*KNOWTON_CONNECT_PORT"):
        Settings.from_env({"KNOWTON_CONECT_PORT": "8083"})


def test_describe_masks_secrets_and_dsn_passwords(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings.from_env(
        {
            "KNOWTON_HOME": str(tmp_path),
            "KNOWTON_PG_PASSWORD": "pg-s3cret",
            "KNOWTON_CLICKHOUSE_DSN": "https://reader:ch-s3cret@ch.example:8443/knowton",
        }
    )
    shown = repr(s) + str(s.describe())
    assert "pg-s3cret" not in shown and "ch-s3cret" not in shown
    assert s.describe()["KNOWTON_CLICKHOUSE_DSN"] == "https://reader:***@ch.example:8443/knowton"


def test_generated_secret_is_stable_and_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings.from_env({"KNOWTON_HOME": str(tmp_path)})
    first = s.cdc_password
    assert first == Settings.from_env({"KNOWTON_HOME": str(tmp_path)}).cdc_password
    assert len(first) >= 24
    assert (tmp_path / "secrets" / "knowton_cdc_password").stat().st_mode & 0o077 == 0


@given(st.text(alphabet=st.characters(blacklist_characters="@/:?#[]%", blacklist_categories=["Cs", "Cc"]), min_size=1))
def test_redact_dsn_never_leaks_the_password(password: str) -> None:
    assert redact_dsn(f"https://user:{password}@host:8443/db") == "https://user:***@host:8443/db"


def test_kraft_cluster_ids_never_look_like_an_option() -> None:
    from knowton_pipeline.stack.components import new_cluster_id

    ids = [new_cluster_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)


def test_reconcile_crons_default_to_hourly_and_daily_and_refuse_a_malformed_cron() -> None:
    assert setting("KNOWTON_RECONCILE_INCREMENTAL_CRON", {}) == "5 * * * *"
    assert setting("KNOWTON_RECONCILE_FULL_CRON", {}) == "30 3 * * *"
    assert setting("KNOWTON_RECONCILE_FULL_CRON", {"KNOWTON_RECONCILE_FULL_CRON": "*/5 * * * *"}) == "*/5 * * * *"
    with pytest.raises(SettingsError, match="KNOWTON_RECONCILE_INCREMENTAL_CRON"):
        setting("KNOWTON_RECONCILE_INCREMENTAL_CRON", {"KNOWTON_RECONCILE_INCREMENTAL_CRON": "hourly"})
