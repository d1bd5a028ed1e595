"""The web view: its state from bus records, and the page in a real headless browser against the real broker,
encoder, query worker and `vmh ui`, with a real video pushed by a real producer."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from harness import lite_checkpoint, render_synthetic, spawn, stop, worker_env
from pipeline.bus.records import ErrorRecord, Keyframe, MatchEvent, StandingQuery, encode
from pipeline.ui.view import STRIP, LiveView

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; `make setup` installs them
HOSTILE = 'a red <script>window.__pwned = 1</script> circle <img src=x onerror="window.__pwned = 2">'


def jpeg(side: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(out, format="JPEG")
    return out.getvalue()


def keyframe(stream: str, t: int, session: str = "s1", data: bytes | None = None) -> bytes:
    return encode(Keyframe(stream, t, float(t), 100.0 + t, data or jpeg(), session))


def test_the_view_follows_streams_queries_and_matches():
    view = LiveView()
    query = StandingQuery("q1", HOSTILE, None, 0, 30, 5.0)
    assert view.apply("queries", b"q1", encode(query))[0]["text"] == HOSTILE
    for t in range(20):
        (event,) = view.apply("keyframes", b"cam", keyframe("cam", t))
    assert event == {"type": "stream", "stream_id": "cam", "seconds": 20, "latest": 19, "capture_time": 119.0,
                     "error": None}
    match = MatchEvent("q1", "cam", 2, 18, 20, 128, 117.0, 118.5)
    (shown,) = view.apply("matches", b"q1", encode(match))
    assert shown["text"] == HOSTILE and shown["latency"] == 1.5
    assert len(shown["frames"]) == STRIP and shown["frames"][0] == 2 and shown["frames"][-1] == 17
    assert view.strip("cam", 0, 3) == [0, 1, 2] and view.strip("other", 0, 3) == []
    assert view.keyframe("cam", 5) == jpeg() and view.keyframe("cam", 99) is None
    # an error of a stream shows on its card; other errors as problems
    error = ErrorRecord("cam", "dead_source", "stream cam: gone", 120.0)
    assert view.apply("errors", b"cam", encode(error))[0]["error"]["kind"] == "dead_source"
    assert view.apply("errors", b"x", encode(ErrorRecord("x", "bad_query", "no", 1.0)))[0]["type"] == "problem"
    # a new producer session counts its seconds anew; garbage is skipped; a tombstone removes the query
    assert view.apply("keyframes", b"cam", keyframe("cam", 0, session="s2"))[0]["seconds"] == 1
    assert view.apply("matches", b"q1", b"\x00garbage") == []
    assert view.apply("queries", b"q1", None) == [{"type": "query-removed", "query_id": "q1"}]
    assert view.apply("queries", b"q1", None) == []
    snapshot = view.snapshot()
    assert snapshot["queries"] == [] and [s["stream_id"] for s in snapshot["streams"]] == ["cam"]
    assert [m["start"] for m in snapshot["matches"]] == [2]


def test_key_frames_are_held_within_the_byte_budget_oldest_out():
    frame = jpeg(64)
    view = LiveView(keyframe_bytes=5 * len(frame))
    for t in range(12):
        view.apply("keyframes", b"cam", keyframe("cam", t, data=frame))
    assert [t for t in range(12) if view.keyframe("cam", t)] == [7, 8, 9, 10, 11]


def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                            options=options)


LOADED = "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length"


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:.0f} s"
        time.sleep(0.25)
    return result


def request(url: str, body: bytes | None = None, headers: dict | None = None, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}, method=method), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.integration
def test_the_page_shows_a_live_match_with_its_key_frames_and_search_hits(kafka_bootstrap, tmp_path, free_port):
    from selenium.webdriver.common.by import By

    from pipeline.bus.topics import create_topics

    prefix = f"ui-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, prefix=prefix, partitions=2)
    env = worker_env(kafka_bootstrap, prefix, VMH_CHECKPOINT=str(lite_checkpoint(tmp_path / "lite")))
    url = f"http://127.0.0.1:{free_port}/"
    workers = [spawn(["encoder", "--instance", "ui-0"], env, tmp_path / "encoder.log"),
               spawn(["query-worker", "--instance", "ui-0"], env, tmp_path / "query.log"),
               spawn(["ui", "--ui-port", str(free_port)], env, tmp_path / "ui.log")]
    video = render_synthetic(tmp_path / "synthetic.mp4", duration=10.0)
    driver = browser(tmp_path)
    started = time.monotonic()
    try:
        until(lambda: _status(url + "healthz") == 200, 90, "the web view")
        # actions take JSON only, and a loopback-bound view answers loopback host names only
        assert request(url + "api/queries", b"text=x", {"Content-Type": "application/x-www-form-urlencoded"},
                       "POST") == 415
        assert request(url + "healthz", headers={"Host": "evil.example"}) == 400
        driver.get(url)
        until(lambda: driver.find_element(By.ID, "connection").text == "live", 30, "the live event stream")
        driver.find_element(By.ID, "query-text").send_keys(HOSTILE)
        driver.find_element(By.ID, "query-threshold").send_keys("128")  # every moment of the random model matches
        driver.find_element(By.ID, "query-add").click()
        shown = until(lambda: driver.find_elements(By.CSS_SELECTOR, "#queries li .text"), 30, "the query")
        assert shown[0].text == HOSTILE  # shown as text, not run or parsed
        assert driver.execute_script("return window.__pwned") is None
        assert not driver.find_elements(By.CSS_SELECTOR, "#queries script, #queries img")
        time.sleep(3)  # the query worker applies new queries between batches
        producer = spawn(["producer", f"cam={video}"], env, tmp_path / "producer.log")
        assert producer.wait(120) == 0, (tmp_path / "producer.log").read_text()[-2000:]
        until(lambda: driver.execute_script(LOADED, ".match .strip img"), 60, "a match with loaded key frames")
        match = driver.find_element(By.CSS_SELECTOR, ".match")
        assert match.find_element(By.CSS_SELECTOR, ".text").text == HOSTILE
        assert "cam" in match.find_element(By.CSS_SELECTOR, ".where").text
        until(lambda: driver.execute_script(LOADED, ".stream img.latest"), 30, "the stream's latest frame")
        assert driver.find_element(By.CSS_SELECTOR, ".stream .seconds").text == "10 seconds seen"
        driver.save_screenshot(str(tmp_path / "ui-match.png"))
        driver.find_element(By.ID, "search-text").send_keys("a red circle moves to the left")
        driver.find_element(By.ID, "search-go").click()
        until(lambda: driver.execute_script(LOADED, "#hits .strip img"), 30, "search hits with key frames")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#hits .hit")) == 10
        driver.save_screenshot(str(tmp_path / "ui-search.png"))
        print(f"page checks took {time.monotonic() - started:.1f} s; screenshots in {tmp_path}")
        # removing the query through the page
        driver.find_element(By.CSS_SELECTOR, "#queries li button.remove").click()
        until(lambda: not driver.find_elements(By.CSS_SELECTOR, "#queries li"), 30, "the query removed")
    finally:
        driver.quit()
        for worker in workers:
            stop(worker)


def _status(url: str) -> int | None:
    """The status of a GET, None while nothing listens there."""
    try:
        return request(url)
    except OSError:
        return None
