"""HTTP client for the coordinator: retries with jittered backoff, counts bytes both ways."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import torch

from crowdtrain import __version__
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.model.gpt import GPTConfig
from crowdtrain.node.credentials import NodeLogin
from crowdtrain.node.tls import certificate_error
from crowdtrain.node.waiting import Stopped, backoff_s, sleep_unless_stopped
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.snapshot import decode_deltas, decode_snapshot

log = logging.getLogger(__name__)

API = "/api/v1"


class Refused(RuntimeError):
    """The server answered 4xx: it read the request and said no."""

    def __init__(self, status: int, body: dict, elapsed_s: float = 0.0):
        self.status = status
        self.body = body
        self.elapsed_s = elapsed_s  # how long the refused request took
        self.code = body.get("error", "")
        super().__init__(f"HTTP {status} {self.code}: {body.get('detail', body)}")


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0


class CoordinatorClient:
    """One node's connection to the server. Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        base_url: str,
        login: NodeLogin | None = None,
        timeout_s: float = 120.0,
        max_backoff_s: float = 30.0,
        should_stop: Callable[[], bool] = lambda: False,
        upload_limit: float | None = None,
        api_token: str | None = None,
        verify: ssl.SSLContext | bool = True,
    ):
        """`login`: a node's identity (node routes); `api_token`: an admin or viewer token
        (reading, downloads); `verify`: the TLS context that checks the server (node/tls.py)."""
        self.base_url = base_url.rstrip("/")
        self.login = login
        self.api_token = api_token
        self.verify = verify
        self.max_backoff_s = max_backoff_s
        self.should_stop = should_stop
        # one bucket for every upload of this node: a cap on its link, not per request
        self._bucket = TokenBucket(upload_limit) if upload_limit else None
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            headers={
                "Accept-Encoding": "zstd, br",
                "User-Agent": f"crowdtrain-node/{__version__}",
            },
            verify=verify,
        )

    @property
    def node_id(self) -> str | None:
        return self.login.node_id if self.login is not None else None

    def connect(self) -> None:
        """Register or log in (a node); a no-op with an API token."""
        if self.login is not None:
            self.login.login(self._http)

    def auth_headers(self) -> dict[str, str]:
        if self.login is not None:
            return {"Authorization": f"Bearer {self.login.bearer(self._http)}"}
        if self.api_token:
            return {"Authorization": f"Bearer {self.api_token}"}
        return {}

    def renew_login(self) -> None:
        """Take a new access token now (the WebSocket handshake found this one expired)."""
        if self.login is not None:
            self.login.renew(self._http)

    def close(self) -> None:
        self._http.close()
        if self.login is not None:
            self.login.release()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send until the server answers; retry connection errors, 5xx and 429 with backoff."""
        attempt, renewed = 0, False
        while True:
            if self.should_stop():
                raise Stopped()
            try:
                response = self._http.request(
                    method, API + path, **self._paced(self._authed(kwargs))
                )
            except httpx.TransportError as exc:
                refusal = certificate_error(exc, self.base_url)
                if refusal is not None:  # retrying cannot fix a certificate
                    raise refusal from None
                reason, retry_after = f"server unreachable ({type(exc).__name__})", None
            else:
                with self._lock:
                    self.traffic.received += response.num_bytes_downloaded
                if response.status_code == 401 and self.login is not None and not renewed:
                    renewed = True  # the access token expired (or the server restarted anew)
                    self.login.renew(self._http)
                    continue
                if response.status_code < 500 and response.status_code != 429:
                    if response.status_code >= 400:
                        raise Refused(
                            response.status_code,
                            _json_or_text(response),
                            response.elapsed.total_seconds(),
                        )
                    return response
                reason = f"server answered {response.status_code}"
                retry_after = _retry_after(response)
            delay = retry_after or backoff_s(attempt, self.max_backoff_s)
            log.warning("%s; retrying in %.1f s", reason, delay)
            attempt += 1
            sleep_unless_stopped(delay, self.should_stop)

    def _authed(self, kwargs: dict) -> dict:
        return {**kwargs, "headers": {**kwargs.get("headers", {}), **self.auth_headers()}}

    def _paced(self, kwargs: dict) -> dict:
        """Request arguments whose body goes through the upload limit (a fresh stream for each
        attempt; Content-Length stays set, so the server still sees the size up front)."""
        body = kwargs.get("content")
        if self._bucket is None or not isinstance(body, bytes):
            return kwargs
        headers = {**kwargs.get("headers", {}), "Content-Length": str(len(body))}
        return {**kwargs, "content": self._bucket.stream(body), "headers": headers}

    def ping(self) -> float | None:
        """Seconds for one small request (GET /health), or None when the server did not answer:
        the round-trip time the density controller subtracts from upload times."""
        started = time.monotonic()
        try:
            self._http.get(API + "/health", timeout=10.0)
        except httpx.HTTPError:
            return None
        return time.monotonic() - started

    def info(self) -> dict:
        return self.request("GET", "/info").json()

    def model_config(self, info: dict | None = None) -> GPTConfig:
        """The GPTConfig of the server's model, from /info (fetched unless given)."""
        return model_config_from_info(info or self.info())

    def manifest(self) -> Manifest:
        return Manifest.from_json(self.request("GET", "/model/manifest").json()["tensors"])

    def tokenizer_json(self) -> str:
        return self.request("GET", "/model/tokenizer").text

    def snapshot(self, manifest: Manifest, dtype: str = "fp32"):
        """(version, lineage, fp32 params) of the server's current weights."""
        response = self.request("GET", "/model/snapshot", params={"dtype": dtype})
        params, meta = decode_snapshot(response.content, manifest)
        return meta["version"], meta["lineage"], params

    def deltas(
        self, since: int, lineage: str, manifest: Manifest, wait: float = 0.0
    ) -> DeltaChain | None:
        """The published deltas after `since` (an empty chain when there is nothing newer);
        None when the node must take a snapshot instead."""
        try:
            response = self.request(
                "GET",
                "/model/deltas",
                params={"since": since, "lineage": lineage, "wait": wait},
                timeout=wait + 60.0,
            )
        except Refused as exc:
            if exc.status == 410:
                return None
            raise
        if response.status_code == 204:
            return DeltaChain([])
        chain, chain_lineage, _ = decode_deltas(response.content, manifest)
        if chain_lineage != lineage:
            return None
        return DeltaChain(chain)

    def submit(self, body: bytes) -> tuple[dict, float]:
        """POST an encoded update: (the server's receipt, seconds the accepted attempt took)."""
        response = self.request(
            "POST",
            "/updates",
            content=body,
            headers={"Content-Encoding": "zstd", "Content-Type": "application/octet-stream"},
        )
        with self._lock:
            self.traffic.sent += len(body)
        return response.json(), response.elapsed.total_seconds()

    def lease(self) -> dict:
        """Lease the next shard (docs/data.md); `lease` is None while none is free."""
        return self.request("POST", "/leases").json()

    def renew(self, lease_id: str) -> float:
        return self.request("POST", f"/leases/{lease_id}/renew").json()["expires_at"]

    def release(self, lease_id: str) -> bool:
        """Give a lease back, once and quickly (the node is stopping); True if the server took
        it. Otherwise it expires on its own."""
        try:
            response = self._http.delete(
                f"{API}/leases/{lease_id}", timeout=5.0, headers=self.auth_headers()
            )
        except (httpx.HTTPError, RuntimeError):
            return False
        return response.status_code == 204

    def shard(self, shard_id: int) -> bytes:
        """A shard's bytes (token ids, then the loss mask when it has one), decompressed."""
        return self.request("GET", f"/shards/{shard_id}").content

    def wait_for_version(self, after: int, wait: float) -> dict:
        return self.request(
            "GET", "/model/version", params={"after": after, "wait": wait}, timeout=wait + 60.0
        ).json()


class TokenBucket:
    """Paces bytes to `rate` per second (bursts of one chunk): a node's upload limit."""

    CHUNK = 16 << 10

    def __init__(self, rate: float):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the bucket is next empty of debt

    def take(self, n: int) -> None:
        """Block until `n` more bytes may go out."""
        with self._lock:
            now = time.monotonic()
            start = max(self._free_at, now - self.CHUNK / self.rate)
            self._free_at = start + n / self.rate
            wait = self._free_at - now - self.CHUNK / self.rate
        if wait > 0:
            time.sleep(wait)

    def stream(self, body: bytes):
        for offset in range(0, len(body), self.CHUNK):
            chunk = body[offset : offset + self.CHUNK]
            self.take(len(chunk))
            yield chunk


def model_config_from_info(info: dict) -> GPTConfig:
    """The GPTConfig in the server's /info answer (which also carries the preset name and the
    parameter count)."""
    model = info["model"]
    return GPTConfig.from_dict(
        {k: v for k, v in model.items() if k in GPTConfig.__dataclass_fields__}
    )


@dataclass
class DeltaChain:
    """Published deltas in version order (each delta carries its value codec)."""

    versions: list[tuple[int, dict[str, SparseDelta]]]

    def __bool__(self) -> bool:
        return bool(self.versions)

    @property
    def last_version(self) -> int:
        return self.versions[-1][0]

    def apply_to(self, params: dict[str, torch.Tensor]) -> int:
        """Advance `params` in place through the chain (the server's own addition, see
        SparseDelta.add_to); returns the version they are at now."""
        with torch.no_grad():
            for _, deltas in self.versions:
                for name, delta in deltas.items():
                    delta.add_to(params[name])
        return self.last_version


def _json_or_text(response: httpx.Response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"detail": body}
    except ValueError:
        return {"detail": response.text[:500]}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None
