"""The density controller and the upload limit: pure logic, driven with chosen measurements."""

from __future__ import annotations

import math
import threading
import time

import pytest

from crowdtrain.node.client import TokenBucket
from crowdtrain.node.density import (
    DEADLINE_SHARE,
    MAX_CHANGE,
    DensityController,
    DensityPolicy,
)

NUMEL = 1_000_000
NO_WARMUP = DensityPolicy(min_density=0.001, max_density=0.25, upload_fraction=0.2, warmup=0)


def controller(policy: DensityPolicy = NO_WARMUP, **kwargs) -> DensityController:
    return DensityController(policy, **kwargs)


def feed(c: DensityController, *, rate: float, compute_s: float, rtt_s: float = 0.0, rounds=1):
    """`rounds` submissions over a link of `rate` bytes/s at the density the controller picks;
    returns the densities it picked."""
    picked = []
    c.observe_rtt(max(rtt_s, 1e-6))
    for _ in range(rounds):
        density = c.next_density(NUMEL)
        picked.append(density)
        entries = math.ceil(density * NUMEL)
        wire = entries * 3  # 3 bytes per entry: index gap + fp16 value after zstd
        c.observe_compute(compute_s)
        c.observe_upload(wire, entries, rtt_s + wire / rate)
    return picked


def test_starts_at_the_top_before_anything_is_measured():
    assert controller().next_density(NUMEL) == 0.25


def test_fixed_density_is_kept_whatever_the_link():
    c = controller(fixed=0.05)
    assert feed(c, rate=1e3, compute_s=0.1, rounds=5) == [0.05] * 5


def test_fixed_density_still_obeys_the_server_cap():
    c = controller(fixed=0.5)
    c.set_server_cap(0.1)
    assert c.next_density(NUMEL) == 0.1


def test_converges_to_the_budget_of_a_slow_link():
    # 1 MB/s, 1 s compute: 20% of it is 0.2 s = 200 kB = ~66,667 entries = density 0.0667
    c = controller()
    picked = feed(c, rate=1e6, compute_s=1.0, rounds=30)
    assert picked[-1] == pytest.approx(0.2 * 1e6 / 3 / NUMEL, rel=0.02)


def test_a_fast_link_stays_at_max_density():
    c = controller()
    assert feed(c, rate=1e9, compute_s=1.0, rounds=10)[-1] == 0.25


def test_a_hopeless_link_bottoms_out_at_min_density():
    c = controller()
    picked = feed(c, rate=1e3, compute_s=0.05, rtt_s=0.5, rounds=40)
    assert picked[-1] == 0.001


def test_density_changes_at_most_by_a_factor_per_update():
    c = controller()
    picked = feed(c, rate=1e4, compute_s=0.1, rounds=15)
    for before, after in zip(picked, picked[1:], strict=False):
        assert after >= before / MAX_CHANGE - 1e-12
        assert after <= before * MAX_CHANGE + 1e-12
    assert picked[-1] < picked[0] / 100  # and it does get there


def test_round_trip_time_counts_against_the_budget():
    fast, laggy = controller(), controller()
    d_fast = feed(fast, rate=1e6, compute_s=1.0, rtt_s=0.0, rounds=30)[-1]
    d_laggy = feed(laggy, rate=1e6, compute_s=1.0, rtt_s=0.1, rounds=30)[-1]
    # the 0.2 s budget loses 0.1 s to the round trip: half the bytes
    assert d_laggy == pytest.approx(d_fast / 2, rel=0.05)


def test_the_server_cap_wins_over_the_link():
    c = controller()
    c.set_server_cap(0.02)
    assert feed(c, rate=1e9, compute_s=1.0, rounds=5)[-1] == 0.02
    c.set_server_cap(None)  # an answer without a cap changes nothing
    c.set_server_cap(0.0)  # nor does nonsense
    assert c.next_density(NUMEL) == 0.02


def test_the_round_deadline_caps_upload_time():
    # a long step (10 s) would allow 2 s of upload, but the round closes 2 s after its first
    # update: an upload may take half of that
    c = controller(DensityPolicy(0.0001, 0.25, upload_fraction=0.2, warmup=0))
    c.deadline_s = 2.0
    picked = feed(c, rate=1e5, compute_s=10.0, rounds=40)
    assert picked[-1] == pytest.approx(DEADLINE_SHARE * 2.0 * 1e5 / 3 / NUMEL, rel=0.05)


def test_compute_longer_than_the_deadline_does_not_starve_the_upload():
    # DiLoCo: 30 s of inner steps per update, a 10 s deadline, a fast link: stay at the top
    c = controller()
    c.deadline_s = 10.0
    assert feed(c, rate=1e8, compute_s=30.0, rounds=20)[-1] == 0.25


def test_warmup_floor_falls_from_max_to_min():
    policy = DensityPolicy(min_density=0.001, max_density=0.25, upload_fraction=0.2, warmup=10)
    c = controller(policy)
    picked = feed(c, rate=1e3, compute_s=0.1, rounds=14)  # the link alone wants min_density
    floors = [0.25 * (0.001 / 0.25) ** (n / 10) for n in range(10)]
    for density, floor in zip(picked, floors, strict=False):
        assert density >= floor - 1e-12
    assert picked[5] > 0.001 and picked[-1] == 0.001


def test_report_carries_the_measurements():
    c = controller()
    feed(c, rate=2e6, compute_s=0.5, rtt_s=0.01, rounds=10)
    report = c.report()
    assert report.upload_bytes_per_s == pytest.approx(2e6, rel=0.01)
    assert report.rtt_s == pytest.approx(0.01)
    assert report.compute_s == pytest.approx(0.5)
    assert report.density == c.density


def test_controller_is_safe_to_share_between_threads():
    c = controller()
    errors = []

    def hammer():
        try:
            feed(c, rate=1e6, compute_s=0.1, rounds=200)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and 0.001 <= c.density <= 0.25


# ---- the upload limit ----------------------------------------------------------------------


def test_token_bucket_streams_every_byte_in_order():
    body = bytes(range(256)) * 500
    assert b"".join(TokenBucket(1e9).stream(body)) == body


def test_token_bucket_paces_to_its_rate():
    rate = 400_000.0
    body = b"x" * 200_000  # 0.5 s at the rate, less the one-chunk burst
    started = time.monotonic()
    assert len(b"".join(TokenBucket(rate).stream(body))) == len(body)
    elapsed = time.monotonic() - started
    expected = (len(body) - TokenBucket.CHUNK) / rate
    assert elapsed >= expected * 0.95  # never faster than the limit (sleeping only adds)


def test_token_bucket_is_shared_by_concurrent_uploads():
    rate = 400_000.0
    bucket = TokenBucket(rate)
    body = b"x" * 100_000
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: b"".join(bucket.stream(body))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # two bodies through one bucket take as long as one body of twice the size
    assert time.monotonic() - started >= (2 * len(body) - TokenBucket.CHUNK) / rate * 0.95
