"""Unit tests for settings: flags > environment > TOML file > defaults; unknown keys fail."""

import os
from pathlib import Path

import pytest

from crowdtrain.settings import (
    CONFIG_ENV,
    NodeSettings,
    ServerSettings,
    SettingsError,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No CROWDTRAIN_* variable from the machine running the tests leaks in."""
    for key in list(os.environ):
        if key.upper().startswith("CROWDTRAIN_"):
            monkeypatch.delenv(key)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crowdtrain.toml"
    path.write_text(text, encoding="utf-8")
    return path


def default(cls, field: str):
    return cls.model_fields[field].default


def test_defaults_come_from_the_field_declarations():
    settings = load_settings(ServerSettings)
    for field in ServerSettings.model_fields:
        assert getattr(settings, field) == default(ServerSettings, field), field
    node = load_settings(NodeSettings)
    for field in NodeSettings.model_fields:
        assert getattr(node, field) == default(NodeSettings, field), field


def test_priority_flags_over_env_over_toml_over_defaults(tmp_path, monkeypatch):
    config = write_config(
        tmp_path,
        "[server]\nport = 7001\nlr = 0.01\nmin_nodes = 3\nmodel = 'small'\n",
    )
    monkeypatch.setenv("CROWDTRAIN_PORT", "7002")
    monkeypatch.setenv("CROWDTRAIN_LR", "0.02")
    settings = load_settings(ServerSettings, config, port=7003, min_nodes=None)
    assert settings.port == 7003  # flag beats env and TOML
    assert settings.lr == 0.02  # env beats TOML
    assert settings.min_nodes == 3  # TOML beats the default (a None flag means unset)
    assert settings.model == "small"
    assert settings.max_staleness == default(ServerSettings, "max_staleness")


def test_env_values_are_parsed(monkeypatch, tmp_path):
    monkeypatch.setenv("CROWDTRAIN_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CROWDTRAIN_DECAY_VERSIONS", "500")
    monkeypatch.setenv("CROWDTRAIN_EVALUATE", "false")
    settings = load_settings(ServerSettings)
    assert settings.data_dir == tmp_path / "d"
    assert settings.decay_versions == 500
    assert settings.evaluate is False


def test_config_file_from_env(tmp_path, monkeypatch):
    config = write_config(tmp_path, "[server]\nport = 7100\n[node]\nbatch_size = 3\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert load_settings(ServerSettings).port == 7100
    assert load_settings(NodeSettings).batch_size == 3


def test_each_section_reads_only_its_table(tmp_path):
    config = write_config(tmp_path, "[node]\nbatch_size = 3\n")
    assert load_settings(ServerSettings, config).port == default(ServerSettings, "port")
    assert load_settings(NodeSettings, config).batch_size == 3


def test_toml_values_do_not_leak_into_a_later_load(tmp_path):
    config = write_config(tmp_path, "[server]\nport = 7200\n")
    assert load_settings(ServerSettings, config).port == 7200
    assert load_settings(ServerSettings).port == default(ServerSettings, "port")


def test_unknown_env_var_fails_naming_it(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_BOGUS", "1")
    with pytest.raises(SettingsError, match="CROWDTRAIN_BOGUS") as info:
        load_settings(ServerSettings)
    assert "CROWDTRAIN_PORT" in str(info.value)  # the known names are listed


def test_unknown_node_env_var_fails_naming_it(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_NODE_BATCHSIZE", "1")
    with pytest.raises(SettingsError, match="CROWDTRAIN_NODE_BATCHSIZE"):
        load_settings(NodeSettings)


def test_server_ignores_node_variables_and_node_ignores_server_ones(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_NODE_BATCH_SIZE", "5")
    monkeypatch.setenv("CROWDTRAIN_PORT", "9000")
    assert load_settings(ServerSettings).port == 9000
    assert load_settings(NodeSettings).batch_size == 5


def test_unknown_toml_key_fails_naming_it_and_the_file(tmp_path):
    config = write_config(tmp_path, "[server]\nprot = 8001\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'") as info:
        load_settings(ServerSettings, config)
    assert str(config) in str(info.value)


def test_unknown_toml_table_fails(tmp_path):
    config = write_config(tmp_path, "[servr]\nport = 8001\n")
    with pytest.raises(SettingsError, match=r"unknown table\(s\) \['servr'\]"):
        load_settings(ServerSettings, config)


def test_section_that_is_not_a_table_fails(tmp_path):
    config = write_config(tmp_path, "server = 5\n")
    with pytest.raises(SettingsError, match=r"\[server\] must be a table"):
        load_settings(ServerSettings, config)


@pytest.mark.parametrize(
    "source, field",
    [
        ("toml:port = 70000", "port"),
        ("toml:lr = 'fast'", "lr"),
        ("env:CROWDTRAIN_MIN_NODES=0", "min_nodes"),
        ("env:CROWDTRAIN_ALGORITHM=diloco9", "algorithm"),
        ("flag:beta1=1.0", "beta1"),
    ],
)
def test_bad_value_fails_naming_the_field(tmp_path, monkeypatch, source, field):
    kind, _, text = source.partition(":")
    config, flags = None, {}
    if kind == "toml":
        config = write_config(tmp_path, f"[server]\n{text}\n")
    elif kind == "env":
        key, _, value = text.partition("=")
        monkeypatch.setenv(key, value)
    else:
        key, _, value = text.partition("=")
        flags[key] = float(value)
    with pytest.raises(SettingsError) as info:
        load_settings(ServerSettings, config, **flags)
    message = str(info.value)
    expected_source = {
        "toml": f"key {field!r} in {config}",
        "env": f"environment variable CROWDTRAIN_{field.upper()}",
        "flag": f"setting {field!r} from the command-line flag",
    }[kind]
    assert expected_source in message


def test_bad_node_value_fails_naming_the_field(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_NODE_NAME", "has spaces")
    with pytest.raises(SettingsError, match="'name'"):
        load_settings(NodeSettings)


def test_missing_config_file_fails(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="does not exist") as info:
        load_settings(ServerSettings, missing)
    assert str(missing) in str(info.value)


def test_invalid_toml_fails(tmp_path):
    config = write_config(tmp_path, "[server\nport = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(ServerSettings, config)


@pytest.mark.parametrize(
    "field, value, choices",
    [("model", "huge", "tiny"), ("optimizer", "lion", "adamw"), ("aggregator", "x", "mean")],
)
def test_unknown_registry_names_fail_at_start_listing_the_choices(field, value, choices):
    with pytest.raises(SettingsError) as info:
        load_settings(ServerSettings, **{field: value})
    assert "unknown" in str(info.value) and value in str(info.value)
    assert choices in str(info.value)


def test_unknown_value_codec_fails_at_start(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_NODE_VALUE_CODEC", "int3")
    with pytest.raises(SettingsError, match="fp16"):
        load_settings(NodeSettings)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500KB", 500_000),
        ("2MB", 2_000_000),
        ("1.5e6", 1_500_000),
        ("2MiB", 2 << 20),
        ("64 kib/s", 65_536),
        ("300", 300),
        ("1GB", 1e9),
        ("1GiB", 1 << 30),
    ],
)
def test_upload_limit_accepts_units(monkeypatch, text, expected):
    monkeypatch.setenv("CROWDTRAIN_NODE_UPLOAD_LIMIT", text)
    assert load_settings(NodeSettings).upload_limit == expected


@pytest.mark.parametrize("text", ["fast", "5 parsecs", "-1MB", "MB"])
def test_bad_upload_limit_fails_naming_the_field(text):
    with pytest.raises(SettingsError, match="upload_limit"):
        load_settings(NodeSettings, upload_limit=text)


def test_min_density_above_max_density_fails():
    with pytest.raises(SettingsError, match="min_density.*above max_density") as info:
        load_settings(NodeSettings, min_density=0.5, max_density=0.1)
    assert "setting ''" not in str(info.value) and "Value error" not in str(info.value)


def test_density_is_left_to_the_controller_by_default():
    settings = load_settings(NodeSettings)
    assert settings.density is None
    assert 0 < settings.min_density < settings.max_density <= 1


def test_no_server_variable_reads_like_a_node_variable():
    """CROWDTRAIN_NODE_* belongs to the node: a server field named node_* would share its
    environment variable with a node setting."""
    node_prefix = NodeSettings.model_config["env_prefix"]
    server_prefix = ServerSettings.model_config["env_prefix"]
    for field in ServerSettings.model_fields:
        assert not (server_prefix + field.upper()).startswith(node_prefix), field


def test_a_session_timeout_under_two_heartbeats_fails():
    with pytest.raises(SettingsError, match=r"session_timeout_s \(3.0\) must be at least twice"):
        load_settings(ServerSettings, heartbeat_s=2.0, session_timeout_s=3.0)
    assert load_settings(ServerSettings, heartbeat_s=2.0, session_timeout_s=4.0)


def test_tls_cert_needs_its_key():
    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        load_settings(ServerSettings, tls_cert="cert.pem")
