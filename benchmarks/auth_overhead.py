"""What does authentication cost a request on the server?

Starts a real `crowdtrain server` (tiny model, `public_dashboard` on, so that GET
/api/v1/model/version answers without a token too) on 127.0.0.1, and sends cheap GETs back to
back from one client thread over one keep-alive connection, in four variants:

- `health`: GET /api/v1/health, a public route;
- `version_public`: GET /api/v1/model/version with no token (the baseline: the same route and
  handler as the next two, so what differs is authentication);
- `version_admin`: the same with the server's admin API token (sha256, a cached lookup);
- `version_node`: the same with a node's access JWT (HS256 signature and claims, node lookup),
  from a registration made before timing.

On a shared machine the speed of anything drifts by 2x within seconds, so the variants take
turns in blocks of a few requests (ABCD, DCBA, ...; ~25 ms a block): each variant sees the same
drift. Per variant: requests/s over its blocks' time, the server's CPU per request (its
process's CPU time over its blocks, summed; the 10 ms clock ticks average out over hundreds of
blocks), and latencies. Ratios are of the totals against `version_public` (and `health`); the
same ratios in consecutive parts of the run show their scatter. In this process, no HTTP:
microseconds per `JwtKeys.verify` and per sha256 digest of an API token, the two checks
themselves. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from _common import (
    API,
    ServerProcess,
    WorkDir,
    log,
    machine,
    percentile,
    process_cpu_seconds,
    ratio,
    run_benchmark,
)
from crowdtrain.server.accounts import digest
from crowdtrain.server.auth import JwtKeys

BASELINE = "version_public"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Requests/s and server CPU per request of GET /model/version with no "
        "token, an admin API token and a node JWT, against GET /health; prints JSON on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="tiny", help="server model preset")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds in all")
    parser.add_argument("--block", type=int, default=25, help="requests of one variant's turn")
    parser.add_argument(
        "--parts", type=int, default=5, help="consecutive parts the ratios are also given for"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds of turns before measuring"
    )
    parser.add_argument(
        "--keep", type=str, default=None, help="keep server data and logs in this folder"
    )
    return parser.parse_args(argv)


def variants(server: ServerProcess) -> dict[str, tuple[str, dict[str, str]]]:
    """Name -> (path, headers) of each kind of request measured."""
    node = server.register("bench-auth-node", server.enrollment_token(uses=1))
    return {
        "health": ("/health", {}),
        BASELINE: ("/model/version", {}),
        "version_admin": ("/model/version", server.admin),
        "version_node": ("/model/version", node.headers),
    }


@dataclass
class Tally:
    """What one variant's blocks added up to."""

    requests: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.server_cpu_s += other.server_cpu_s
        self.latencies += other.latencies

    def figures(self) -> dict:
        return {
            "requests_per_s": round(self.requests / self.seconds, 1),
            "server_cpu_us_per_request": round(1e6 * self.server_cpu_s / self.requests, 1),
            "latency_ms_p50": _milliseconds(percentile(self.latencies, 50)),
            "latency_ms_p99": _milliseconds(percentile(self.latencies, 99)),
            "requests": self.requests,
        }


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def request_block(
    client: httpx.Client, server_pid: int, path: str, headers: dict[str, str], count: int
) -> Tally:
    """`count` GETs of `path` back to back; their time, the server's CPU time, latencies."""
    latencies = []
    server_cpu = process_cpu_seconds(server_pid) or 0.0
    started = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        response = client.get(API + path, headers=headers)
        latencies.append(time.perf_counter() - began)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status_code} {response.text[:300]}")
    seconds = time.perf_counter() - started
    server_cpu_used = (process_cpu_seconds(server_pid) or 0.0) - server_cpu
    return Tally(count, seconds, server_cpu_used, latencies)


def measure(server: ServerProcess, args: argparse.Namespace) -> list[dict[str, Tally]]:
    """One {variant: Tally} per turn of every variant (ABCD, DCBA, ...), after a warm-up."""
    requests = variants(server)
    names = list(requests)
    turns: list[dict[str, Tally]] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for phase, seconds in (("warm-up", args.warmup), ("measuring", args.seconds)):
            log(f"{phase}: {seconds:.0f} s of turns of {args.block} requests per variant")
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                order = names if len(turns) % 2 == 0 else names[::-1]
                turn = {
                    name: request_block(client, server.pid, *requests[name], args.block)
                    for name in order
                }
                if phase == "measuring":
                    turns.append(turn)
    return turns


def totals(turns: list[dict[str, Tally]]) -> dict[str, Tally]:
    summed: dict[str, Tally] = {}
    for result in turns:
        for name, tally in result.items():
            summed.setdefault(name, Tally()).add(tally)
    return summed


def ratios(figures: dict[str, dict], key: str, against: str) -> dict[str, float | None]:
    """Every other variant's `key` over `against`'s."""
    return {
        f"{name}_vs_{against}": ratio(values[key], figures[against][key])
        for name, values in figures.items()
        if name != against
    }


def in_process_checks(seconds: float = 0.5) -> dict:
    """Microseconds per node-JWT verification and per API-token digest, no server, no HTTP."""
    keys = JwtKeys(secrets.token_hex(32).encode("ascii"), ttl_s=900)
    token, _ = keys.issue("bench-auth-node", registration=1)
    api_token = "ct_admin_" + secrets.token_urlsafe(32)
    return {
        "jwt_verify_us": _microseconds(lambda: keys.decode(token), seconds),
        "jwt_verify_cached_us": _microseconds(lambda: keys.verify(token), seconds),
        "api_token_digest_us": _microseconds(lambda: digest(api_token), seconds),
    }


def _microseconds(call: Callable[[], object], seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        calls += 1
    return round(1e6 * (time.perf_counter() - started) / calls, 2)


def report(turns: list[dict[str, Tally]], parts: int) -> dict:
    """Figures per variant, ratios against the baseline, and the ratios per part of the run."""
    figures = {name: tally.figures() for name, tally in totals(turns).items()}
    size = max(1, len(turns) // parts)
    by_part = [
        {name: tally.figures() for name, tally in totals(turns[i : i + size]).items()}
        for i in range(0, len(turns) - size + 1, size)
    ]
    base = figures[BASELINE]
    authenticated = ("version_admin", "version_node")
    return {
        "variants": figures,
        "ratios": {
            "requests_per_s_vs_version_public": ratios(figures, "requests_per_s", BASELINE),
            "requests_per_s_vs_health": ratios(figures, "requests_per_s", "health"),
            "server_cpu_vs_version_public": ratios(figures, "server_cpu_us_per_request", BASELINE),
        },
        "added_per_request_vs_version_public": {
            name: {
                "server_cpu_us": round(
                    figures[name]["server_cpu_us_per_request"] - base["server_cpu_us_per_request"],
                    1,
                ),
                "latency_us_p50": round(
                    1000 * (figures[name]["latency_ms_p50"] - base["latency_ms_p50"]), 1
                ),
            }
            for name in authenticated
        },
        "part_ratios": {
            key: {
                name: [ratio(part[name][key], part[BASELINE][key]) for part in by_part]
                for name in authenticated
            }
            for key in ("requests_per_s", "server_cpu_us_per_request")
        },
        "ratio_notes": {
            "requests_per_s_vs_*": "variant / baseline requests per second over the whole run "
            "(below 1: slower than the baseline)",
            "server_cpu_vs_version_public": "variant / baseline server CPU per request (above "
            "1: authentication costs server CPU)",
            "part_ratios": f"the same ratios in {len(by_part)} consecutive parts of the run: "
            "their spread is the noise",
        },
    }


def run(args: argparse.Namespace) -> dict:
    work = WorkDir(args.keep)
    settings = {
        "model": args.model,
        "evaluate": False,
        "checkpoint_every": 1_000_000,
        "public_dashboard": True,  # the baseline: the same route without a token
        "access_token_ttl_s": 86_400,  # no renewal within a run
    }
    server = ServerProcess(work.logs, work.path / "server-data", settings)
    try:
        log(f"starting a {args.model} server ...")
        server.wait_until_up()
        turns = measure(server, args)
    finally:
        server.stop()
        work.cleanup()
    figures = report(turns, args.parts)
    by_requests = figures["ratios"]["requests_per_s_vs_version_public"]
    log(
        f"requests/s vs no token: admin token {by_requests['version_admin_vs_version_public']}, "
        f"node JWT {by_requests['version_node_vs_version_public']}"
    )
    return {
        "benchmark": "auth_overhead",
        "machine": machine(),
        "settings": {
            "model": args.model,
            "measured_s": args.seconds,
            "requests_per_block": args.block,
            "turns": len(turns),
            "warmup_s": args.warmup,
            "client": "one thread, one keep-alive httpx connection, requests back to back",
            "public_dashboard": True,
        },
        **figures,
        "in_process_us": in_process_checks(),
    }


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
