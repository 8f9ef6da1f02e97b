"""The web UI in headless Chromium while a swarm trains: the dashboard's charts move, the chat
streams, the download button yields a bundle that loads back, and every page fits a phone and a
desktop. The screenshots docs/ui.md shows are saved here (docs/images/ui-*.png)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from crowdtrain.model.bundle import load_bundle
from crowdtrain.model.generate import generate
from crowdtrain.server.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow

VIEWPORTS = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1440, "height": 900}}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"

# page -> the elements that must be visible once it has loaded
PAGES = {
    "dashboard": ["stat-version", "chart-loss", "chart-throughput"],
    "nodes": ["nodes-table", "server-resources"],
    "chat": ["chat-model", "chat-input", "chat-send"],
    "models": ["models-table", "model-download-current"],
    "data": ["data-status", "upload-submit"],
    "admin": ["tokens-table", "audit-table"],
}
SCREENSHOTTED = {
    ("dashboard", "desktop"),
    ("dashboard", "phone"),
    ("nodes", "desktop"),
    ("chat", "phone"),  # chat at desktop width: with an answer, in test_chat_streams_an_answer
    ("models", "desktop"),
    ("data", "desktop"),
    ("admin", "desktop"),
}
# points in each series of the ECharts chart whose container has this test id (null: none yet)
CHART_POINTS = """(testid) => {
  const box = document.querySelector(`[data-testid="${testid}"]`);
  const chart = box && window.echarts && window.echarts.getInstanceByDom(box);
  return chart ? chart.getOption().series.map((s) => (s.data || []).length) : null;
}"""
# from now on, every change of the newest answer in the chat log: [text length, still streaming]
RECORD_ANSWER = """() => {
  window.answerReads = [];
  if (window.answerObserver) return;
  const log = document.querySelector("[data-testid=chat-log]");
  window.answerObserver = new MutationObserver(() => {
    const answers = log.querySelectorAll("[data-testid=chat-message][data-role=assistant]");
    const answer = answers[answers.length - 1];
    if (!answer) return;
    window.answerReads.push([answer.textContent.length, answer.classList.contains("streaming")]);
  });
  const what = { subtree: true, childList: true, characterData: true, attributes: true };
  window.answerObserver.observe(log, what);
}"""


def by_testid(name: str) -> str:
    return f"[data-testid={name!r}]"


def wait_for_points(page, chart: str, more_than: int, series: int = 0, timeout: float = 30):
    """The chart's per-series point counts once `series` has more than `more_than` points."""
    deadline = time.monotonic() + timeout
    points = None
    while time.monotonic() < deadline:
        points = page.evaluate(CHART_POINTS, chart)
        if points and points[series] > more_than:
            return points
        page.wait_for_timeout(500)
    raise AssertionError(f"{chart} stayed at {points} points (wanted more than {more_than})")


def save_screenshot(page, name: str, viewport_name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"ui-{name}-{viewport_name}.png")


def shown_version(page) -> int:
    """The version the dashboard's figure says."""
    return int(page.inner_text(f"{by_testid('stat-version')} .value").replace(",", ""))


def test_dashboard_charts_gain_points_while_training(open_page, swarm):
    page = open_page("/ui/#/dashboard")
    before = wait_for_points(page, "chart-loss", 0)
    version_before = shown_version(page)
    swarm.wait_for(lambda: swarm.version() > version_before + 2, 60, "three more versions")
    wait_for_points(page, "chart-loss", before[0])
    assert page.evaluate(CHART_POINTS, "chart-throughput")[0] > 0
    assert page.evaluate(CHART_POINTS, "chart-updates")[0] > 0
    # the validation series fills in as the Evaluator scores versions (every 5 here)
    wait_for_points(page, "chart-loss", 0, series=1)
    version_after = shown_version(page)
    assert version_after > version_before
    assert page.js_errors == []


def test_sign_in_through_the_login_dialog(open_page, swarm):
    page = open_page("/ui/#/dashboard", login=False)
    page.wait_for_selector(by_testid("login-dialog"), state="visible")  # the API said 401
    page.fill(by_testid("login-token"), "ct_admin_not-a-real-token")
    page.click(by_testid("login-submit"))
    page.wait_for_selector(f"{by_testid('login-error')}:not([hidden])")
    page.fill(by_testid("login-token"), swarm.admin_token)
    page.click(by_testid("login-submit"))
    page.wait_for_selector(by_testid("login-dialog"), state="hidden")
    page.wait_for_function(
        "() => /^[0-9,]+$/.test(document.querySelector('[data-testid=stat-version] .value')"
        ".textContent)"
    )
    assert page.evaluate("localStorage.getItem('crowdtrain.token')") == swarm.admin_token
    assert page.js_errors == []


def ask(page, message: str) -> tuple[list, str]:
    """Send a message from the chat page; the answer's recorded changes and its final text."""
    page.evaluate(RECORD_ANSWER)
    page.fill(by_testid("chat-input"), message)
    page.click(by_testid("chat-send"))
    answer = page.wait_for_selector(
        "[data-testid=chat-message][data-role=assistant]:not(.streaming)", timeout=60_000
    )
    log = page.inner_text(by_testid("chat-log"))
    assert page.query_selector(by_testid("chat-error")) is None, log
    return page.evaluate("window.answerReads"), answer.text_content()


def test_chat_streams_an_answer(open_page):
    page = open_page("/ui/#/chat")
    page.wait_for_selector(f"{by_testid('chat-model')} option[value=current]", state="attached")
    page.fill(by_testid("chat-max-tokens"), "60")
    for _ in range(3):  # a young model may end its answer after a token or two: ask again
        reads, text = ask(page, "The for statement")
        streamed = [length for length, streaming in reads if streaming and length > 0]
        if len(set(streamed)) >= 3:
            break
        page.click(by_testid("chat-clear"))
    # several partial answers, each longer than the last, before the answer is done
    assert len(set(streamed)) >= 3, reads
    assert streamed == sorted(streamed), reads
    assert len(text) >= streamed[-1] > 0
    assert page.is_enabled(by_testid("chat-send"))
    assert page.js_errors == []
    save_screenshot(page, "chat", "desktop")


@pytest.mark.parametrize("viewport_name", ["desktop", "phone"])
@pytest.mark.parametrize("name", list(PAGES))
def test_page_fits_the_screen(open_page, name, viewport_name):
    viewport = VIEWPORTS[viewport_name]
    page = open_page(f"/ui/#/{name}", viewport=viewport)
    page.wait_for_selector(by_testid(f"page-{name}"))
    for element in PAGES[name]:
        page.wait_for_selector(by_testid(element), state="visible")
    if name == "dashboard":
        wait_for_points(page, "chart-loss", 0)
    # every panel has answered (none still says "loading…")
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=page]').innerText.includes('loading…')"
    )
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= viewport["width"], f"{name} scrolls sideways: {width} px wide"
    for tab in PAGES:  # every page's tab can be reached without scrolling
        box = page.locator(by_testid(f"nav-{tab}")).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (tab, box)
    assert page.query_selector(by_testid("error")) is None, page.inner_text(by_testid("error"))
    assert page.js_errors == []
    if (name, viewport_name) in SCREENSHOTTED:
        save_screenshot(page, name, viewport_name)


def download_bundle(page, model_id: str, directory):
    """Click the model's download button; the bundle the browser saved, loaded."""
    with page.expect_download(timeout=60_000) as started:
        page.click(by_testid(f"model-download-{model_id}"))
    path = directory / started.value.suggested_filename
    started.value.save_as(path)
    assert path.suffix == ".zip", path
    # torch's worker threads fight the swarm's processes for the 2 cores of CI: one thread
    # loads this small bundle ten times faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_bundle(path)
    finally:
        torch.set_num_threads(threads)


def test_download_button_yields_a_bundle_that_loads(open_page, swarm, tmp_path):
    lineage = swarm.get("/info")["lineage"]
    checkpoints = CheckpointStore(swarm.checkpoint_dir)
    saved = swarm.wait_for(
        lambda: [v for v, _ in checkpoints.list() if v > 0], 60, "a checkpoint past version 0"
    )[-1]
    page = open_page("/ui/#/models")

    version_before = swarm.version()
    current = download_bundle(page, "current", tmp_path)
    assert current.info.version >= version_before and current.info.lineage == lineage
    prompt = current.tokenizer.encode("The for statement")
    ids = list(generate(current.model, prompt, 8, generator=torch.Generator().manual_seed(0)))
    assert len(ids) == 8

    # a kept checkpoint: its bundle holds exactly the weights the server saved at that version
    bundle = download_bundle(page, f"v{saved}", tmp_path)
    assert bundle.info.version == saved
    expected = checkpoints.load(checkpoints.path_for(saved)).params
    weights = dict(bundle.model.trainable_named_parameters())
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name].detach(), tensor), name
    assert page.js_errors == []
