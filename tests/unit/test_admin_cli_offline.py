"""The admin commands without a server: the offline token and the checks made before any
request (tests/e2e/test_admin_cli.py runs them against a real server)."""

from __future__ import annotations

import hashlib
import os

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain.db import Database
from crowdtrain.db.models import AccessToken, AuditEvent


@pytest.fixture(autouse=True)
def no_crowdtrain_environment(monkeypatch):
    for key in os.environ:
        if key.upper().startswith("CROWDTRAIN_"):
            monkeypatch.delenv(key)


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_an_offline_token_is_stored_as_its_hash_only(tmp_path):
    Database.in_directory(tmp_path).close()  # what a server makes at its first start
    result = run(
        "tokens", "create", "--role", "admin", "--label", "recovery", "--data-dir", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("ct_admin_")
    assert "CROWDTRAIN_ADMIN_TOKEN" in result.stderr

    database = Database.in_directory(tmp_path)
    with database.session() as session:
        token = session.scalar(select(AccessToken).where(AccessToken.label == "recovery"))
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "token.create"))
    database.close()
    assert token.hash == hashlib.sha256(secret.encode()).hexdigest()
    assert token.prefix == secret[: len(token.prefix)] and len(token.prefix) < len(secret) // 2
    assert (token.role, token.kind, token.revoked_at) == ("admin", "api", None)
    assert event.actor.startswith("local") and event.target == f"token:{token.id}"


def test_an_offline_node_token_keeps_its_limits(tmp_path):
    Database.in_directory(tmp_path).close()
    result = run(
        "tokens", "create", "--role", "node", "--uses", "3", "--expires", "12h",
        "--data-dir", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"max_uses": 3' in result.stdout and '"kind": "enroll"' in result.stdout


def test_offline_refuses_a_folder_without_the_servers_database(tmp_path):
    typo = tmp_path / "crowdtrain-dat"
    message = error_line(run("tokens", "create", "--role", "admin", "--data-dir", str(typo)))
    assert "holds no crowdtrain.db" in message
    assert not typo.exists()  # a typo makes no new database


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--role", "node", "--expires", "soon"], "'soon' is not a duration"),
        (["--role", "viewer", "--uses", "2"], "only node tokens have it"),
    ],
)
def test_offline_checks_what_the_server_checks(tmp_path, args, expected):
    Database.in_directory(tmp_path).close()
    result = run("tokens", "create", *args, "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and expected in error_line(result)


def test_without_an_admin_token_the_error_says_where_to_get_one():
    message = error_line(run("tokens", "list"))
    assert "CROWDTRAIN_ADMIN_TOKEN" in message and "--data-dir" in message


def test_a_malformed_node_id_is_refused_before_any_request():
    result = run("nodes", "ban", "a/b", "--admin-token", "ct_admin_" + "x" * 43)
    assert "'a/b' is not a node id" in error_line(result)


def test_every_admin_command_explains_itself():
    for command in (["tokens", "create"], ["tokens", "list"], ["tokens", "revoke"],
                    ["nodes", "list"], ["nodes", "ban"], ["audit"]):  # fmt: skip
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command


def test_the_admin_commands_server_url_is_no_unknown_server_setting(monkeypatch, tmp_path):
    from crowdtrain.settings import ServerSettings, load_settings

    monkeypatch.setenv("CROWDTRAIN_SERVER", "https://train.example.org")
    assert load_settings(ServerSettings, None, data_dir=tmp_path).data_dir == tmp_path


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "ftp://host", "http://host:99999"])
def test_a_server_that_is_no_url_is_refused_before_any_request(url):
    result = run("tokens", "list", "--admin-token", "ct_admin_" + "x" * 43, "--server", url)
    assert "--server must be an http:// or https:// URL" in error_line(result)


def test_an_admin_token_no_header_can_carry_is_refused():
    assert "no crowdtrain token has" in error_line(run("audit", "--admin-token", "ct_é"))
