"""TLS end to end: real servers over HTTPS (a test CA from trustme, and --self-signed) and real
nodes that trust them (--ca-cert, --pin-sha256) or refuse them with a clear message."""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from crowdtrain.demo import Swarm, free_port, wait_until_up
from crowdtrain.node.tls import client_ssl

pytestmark = pytest.mark.slow

SERVER_ENV = {"CROWDTRAIN_EVALUATE": "false", "CROWDTRAIN_WARMUP_VERSIONS": "0"}
# the node's WebSocket session (wss://) exists once crowdtrain.node.session does
HAS_SESSIONS = importlib.util.find_spec("crowdtrain.node.session") is not None


@dataclass
class TlsServer:
    """A server under test at an https:// URL, with the nodes started against it."""

    swarm: Swarm
    url: str
    root: Path

    def start_node(self, *args: str):
        env = {"CROWDTRAIN_NODE_CACHE_DIR": str(self.root / "node-cache")}
        index = len(self.swarm.nodes)
        return self.swarm.start_node(index, self.url, 0.25, 1, args, env)

    def get(self, path: str):
        """GET an API path as the admin; the JSON answer."""
        return httpx.get(
            f"{self.url}/api/v1{path}", headers=self.swarm.admin, verify=self.swarm.verify
        ).json()

    def log(self, name: str) -> str:
        path = self.swarm.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.swarm.log_dir.glob("*.log"))
        )


def _launch(root: Path, *flags: str) -> TlsServer:
    (root / "logs").mkdir(parents=True)
    swarm = Swarm(root / "logs")
    port = free_port()
    swarm.start_server(port, root / "server-data", "tiny", SERVER_ENV, flags)
    return TlsServer(swarm, f"https://127.0.0.1:{port}", root)


def _wait_for_fingerprint(server: TlsServer, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"--pin-sha256 ([0-9A-F:]{95})", server.log("server"))
        if found:
            return found.group(1)
        if server.swarm.server.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"the --self-signed server printed no fingerprint\n{server.logs()}")


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, authority):
    """Two servers started side by side: one with a certificate from a test CA (--tls-cert,
    --tls-key), one --self-signed."""
    root = tmp_path_factory.mktemp("tls")
    authority.cert_pem.write_to_path(str(root / "ca.pem"))
    leaf = authority.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(root / "key.pem"))
    started: list[TlsServer] = []
    try:
        with_ca = _launch(
            root / "ca",
            *("--tls-cert", str(root / "cert.pem"), "--tls-key", str(root / "key.pem")),
        )
        started.append(with_ca)
        self_signed = _launch(root / "self-signed", "--self-signed")
        started.append(self_signed)
        with_ca.swarm.verify = client_ssl(with_ca.url, ca_cert=root / "ca.pem")
        wait_until_up(with_ca.url, with_ca.swarm.server, 120, verify=with_ca.swarm.verify)
        pin = _wait_for_fingerprint(self_signed, 120)
        self_signed.swarm.verify = client_ssl(  # waits while uvicorn starts listening
            self_signed.url, pin_sha256=pin, should_stop=lambda: self_signed.swarm.server.poll()
        )
        wait_until_up(self_signed.url, self_signed.swarm.server, 120, self_signed.swarm.verify)
        yield {"ca": with_ca, "self-signed": self_signed, "pin": pin, "root": root}
    finally:
        for server in started:
            server.swarm.stop_nodes(timeout=20)
            server.swarm.stop_server(timeout=30)


def _assert_trained(server: TlsServer, node, name: str) -> None:
    assert node.wait(timeout=120) == 0, server.logs()
    record = next(n for n in server.get("/info")["nodes"] if n["node_id"] == name)
    assert record["updates_accepted"] >= 2, record
    if HAS_SESSIONS:  # its WebSocket session went over wss:// with the same trust
        assert record["sessions"] >= 1, server.logs()


def test_nodes_trust_the_right_ca_and_refuse_a_wrong_one(servers):
    server, root = servers["ca"], servers["root"]
    trustme.CA().cert_pem.write_to_path(str(root / "other-ca.pem"))
    good = server.start_node("--ca-cert", str(root / "ca.pem"), "--max-updates", "4")
    wrong_ca = server.start_node("--ca-cert", str(root / "other-ca.pem"))
    wrong_pin = server.start_node("--pin-sha256", "AB" * 32)
    no_trust = server.start_node()  # the usual CAs: the test CA is not among them

    for node in (wrong_ca, wrong_pin, no_trust):
        assert node.wait(timeout=90) == 1, server.logs()
    for index in (1, 3):  # refused at the handshake, before any token went out
        log = server.log(f"node-{index}")
        assert "failed verification" in log and "--ca-cert" in log and "--pin-sha256" in log
        assert "Traceback" not in log
    pinned = server.log("node-2")
    assert "refusing to connect" in pinned and "AB:AB:AB" in pinned, pinned
    assert "Traceback" not in pinned
    registered = {node["node_id"] for node in server.get("/nodes")}
    assert not registered & {"demo-node-1", "demo-node-2", "demo-node-3"}, registered
    _assert_trained(server, good, "demo-node-0")


def test_a_self_signed_server_and_a_pinned_node(servers):
    server = servers["self-signed"]
    assert "listening on https://" in server.log("server")
    node = server.start_node("--pin-sha256", servers["pin"].lower(), "--max-updates", "4")
    _assert_trained(server, node, "demo-node-0")
