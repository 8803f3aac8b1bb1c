"""The voice-chat page (web/static) in real headless Chromium, against the real server on loopback.

Chromium's fake microphone plays a wav made here (440 Hz beeps); the page captures it with its
AudioWorklet, resamples it to 24 kHz and streams it, plays what the server says from its jitter buffer,
and drops that audio when the model hears a barge-in (forced, as in test_server_e2e.py, by biasing the
tiny random model towards its IRQ token). Asserted: the page's counters (``window.voiceChat``), its DOM,
and what the server received. Screenshots go to artifacts/web/, also when a wait times out.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/system-deps.sh installs them) and selenium;
without them the tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import websockets.sync.client

from tests.conftest import tiny_model

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"
BEEP_HZ = 440.0


def _browser_or_reason() -> tuple[str, str] | str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return "Chromium and chromedriver are needed: run scripts/system-deps.sh (apt-get install chromium chromium-driver)"
    return chromium, driver


def write_beeps(path: Path, rate: int = 48000, seconds: float = 2.0) -> None:
    """The fake microphone: 0.3 s of 440 Hz, 0.2 s of silence, looped by Chromium."""
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * BEEP_HZ * t) * ((t % 0.5) < 0.3)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


class Page:
    """The voice-chat page in one Chromium tab: counters, DOM, waits that explain themselves."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def open(self, url: str, query: str = "") -> Page:
        self.driver.get("about:blank")  # the previous page's sockets and audio go away
        self.driver.get(url + "/" + query)
        self.wait(lambda s: s is not None and s["state"] == "idle", 10, "the page to load")
        return self

    def state(self) -> dict | None:
        return self.driver.execute_script("return window.voiceChat ? JSON.parse(JSON.stringify(window.voiceChat)) : null")

    def wait(self, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if s is not None and predicate(s):
                return s
            if time.monotonic() > deadline:
                name = "failed-" + "".join(c if c.isalnum() else "-" for c in what)[:60] + ".png"
                self.screenshot(name)
                logs = [e["message"] for e in self.driver.get_log("browser")]
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}\nstatus: {self.text('status')!r}\n"
                    f"window.voiceChat: {json.dumps(s)}\nconsole: {logs}\nscreenshot: {ARTIFACTS / name}"
                )
            time.sleep(0.1)

    def el(self, id_: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, id_)

    def click(self, id_: str) -> None:
        self.el(id_).click()

    def type(self, id_: str, text: str) -> None:
        self.el(id_).send_keys(text)

    def text(self, id_: str) -> str:
        return self.el(id_).text

    def visible(self, id_: str) -> bool:
        return self.el(id_).is_displayed()

    def say(self, text: str) -> None:
        self.type("text", text)
        self.click("send")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(ARTIFACTS / name))
        return ARTIFACTS / name


def launch(wav: Path, *, microphone_allowed: bool = True):
    """Headless Chromium whose fake microphone plays ``wav``; with ``microphone_allowed=False`` every
    permission prompt is answered "block", as a user who denies the microphone does."""
    found = _browser_or_reason()
    if isinstance(found, str):
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {found}")
        pytest.skip(found)
    chromium, chromedriver = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,760",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required", "--mute-audio"]
    args.append("--use-fake-ui-for-media-stream" if microphone_allowed else "--deny-permission-prompts")
    for arg in args:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(chromedriver))


@pytest.fixture(scope="module")
def beeps(tmp_path_factory) -> Path:
    wav = tmp_path_factory.mktemp("web") / "beeps.wav"
    write_beeps(wav)
    return wav


@pytest.fixture(scope="module")
def browser(beeps):
    """One browser for the module (each test opens the page afresh, on its own server's origin)."""
    driver = launch(beeps)
    try:
        yield Page(driver)
    finally:
        driver.quit()


def sessions(srv) -> int:
    with urllib.request.urlopen(f"{srv.http_url}/readyz", timeout=5) as r:
        return json.loads(r.read())["sessions"]


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class CuttableProxy:
    """A TCP relay in front of the server: ``cut()`` drops every connection with no close frame (as a
    network loss does) and refuses new ones until ``restore()``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.down = False
        self.refused = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        def drop() -> None:
            self.down = True
            for w in self._writers:
                w.transport.abort()

        self.loop.call_soon_threadsafe(drop)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "down", False)

    async def _shutdown(self) -> None:
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in relays:
            t.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# ------------------------------------------------------------------ the files (no browser needed)
def test_the_app_serves_the_page_and_only_its_own_files(make_server):
    srv = make_server()

    def get(path: str, accept: str = "*/*"):
        req = urllib.request.Request(srv.http_url + path, headers={"Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.headers.get("content-type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("content-type", ""), e.read().decode()

    status, ctype, body = get("/", "text/html,*/*")
    assert status == 200 and ctype.startswith("text/html") and 'src="static/app.js"' in body
    for name in ("app.js", "audio-worklet.js", "resampler.js"):  # modules and worklets need a JS type
        status, ctype, _ = get(f"/static/{name}")
        assert status == 200 and "javascript" in ctype, (name, ctype)
    assert get("/static/style.css")[1].startswith("text/css")
    assert json.loads(get("/", "application/json")[2])["realtime"] == "/v1/realtime"  # API clients still learn where
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/../realtime/app.py"):
        assert get(path)[0] == 404, path


# ------------------------------------------------------------------ a whole conversation
def test_page_streams_the_microphone_plays_the_answer_and_drops_it_on_interruption(browser, make_server):
    model = tiny_model(2)
    srv = make_server(model=model, capacity=2)
    heard: list[np.ndarray] = []  # what reached the engine from the page's microphone, at the model's rate
    push = srv.engine.push_audio
    srv.engine.push_audio = lambda handle, x: (heard.append(x.copy()), push(handle, x))[1]

    # a 400 ms jitter buffer (120 ms by default): the server's frames come late on a busy 2-core machine,
    # and this test asserts that no gap was played and that buffered audio was dropped
    page = browser.open(srv.http_url, "?buffer_ms=400")
    page.click("start")
    s = page.wait(lambda s: s["state"] == "live" and s["framesSent"] >= 25, 20, "a live session with 1 s of microphone")
    assert s["peakLevel"] > -25, "the level meter did not see the 440 Hz beeps"
    # the meter shows the current chunk's level; the fake microphone beeps with silences between, so wait
    # for a beep rather than reading the meter once
    wait_until(lambda: page.el("level").get_attribute("value") != "-60", 5, "the level meter to show a beep")

    page.say("hello there")
    s = page.wait(lambda s: s["chunksPlayed"] >= 3, 20, "the answer to start playing")
    sent_at_start, received_at_start = s["framesSent"], s["chunksReceived"]
    s = page.wait(lambda s: s["chunksPlayed"] >= 15 and s["bufferedMs"] >= 200, 20, "0.6 s of the answer played")
    assert s["bufferMs"] == 400
    assert s["interruptions"] == 0 and s["chunksDropped"] == 0
    assert page.text("transcript").count("hello there") == 2  # the user's line and the (echoed) assistant's

    model.set_logit_bias(model.cfg.lslm.irq_id, 1e4)  # the model hears the user barge in
    s = page.wait(lambda s: s["events"].get("response.done") == 1 and s["droppedMs"] > 0, 10,
                  "the interrupted response to end and the page to drop its audio")
    model.set_logit_bias(model.cfg.lslm.irq_id, 0.0)
    # full duplex: the microphone kept streaming, one 40 ms frame per 40 ms frame of the answer
    assert s["framesSent"] - sent_at_start >= (s["chunksReceived"] - received_at_start) - 5
    assert s["interruptions"] == 1
    time.sleep(0.5)
    after = page.state()
    assert after["playedMs"] == s["playedMs"], "audio kept playing after the interruption"
    assert after["bufferedMs"] == 0 and after["droppedMs"] > 0 and after["chunksDropped"] >= 1
    # every chunk received was played or dropped, none twice: in chunks and in time (the resampler's edges aside)
    assert after["chunksPlayed"] + after["chunksDropped"] == after["chunksReceived"]
    assert abs(after["playedMs"] + after["droppedMs"] - 40 * after["chunksReceived"]) < 5
    assert after["underruns"] == 0, "playback ran dry mid-answer: the jitter buffer let a gap through"
    assert page.visible("interrupted") and "Interrupted" in page.text("status")
    assert "interrupted: you spoke" in page.text("transcript")
    page.screenshot("voice_chat_interrupted.png")

    page.say("again")  # the session goes on: the next answer plays
    page.wait(lambda s: s["chunksPlayed"] >= after["chunksPlayed"] + 5, 20, "the next answer to play")
    assert not page.visible("interrupted")
    page.click("start")  # stop
    s = page.wait(lambda s: s["state"] == "idle", 5, "the page to stop")
    wait_until(lambda: sessions(srv) == 0, 10, "the server to close the session")

    # the server heard exactly what the page sent: 440 Hz (so the page resampled to 24 kHz right)
    audio = np.concatenate(heard)
    per_frame = 960 * srv.engine.model.sample_rate // 24000
    assert abs(audio.size - s["framesSent"] * per_frame) <= 2 * per_frame
    rate = srv.engine.model.sample_rate
    window = audio[-rate:] * np.hanning(rate)
    peak_hz = np.argmax(np.abs(np.fft.rfft(window))) * rate / window.size
    assert abs(peak_hz - BEEP_HZ) <= 2, f"the microphone reached the server at {peak_hz} Hz, not {BEEP_HZ}"


# ------------------------------------------------------------------ what goes wrong, and what the page says
def test_refused_session_says_the_server_is_full_and_gets_in_when_a_slot_frees(browser, make_server):
    srv = make_server(capacity=1)
    holder = websockets.sync.client.connect(srv.ws_url)
    assert json.loads(holder.recv(timeout=10))["type"] == "session.created"

    page = browser.open(srv.http_url)
    page.click("start")
    s = page.wait(lambda s: s["state"] == "refused", 20, "the refusal")
    assert s["lastError"] == "session_limit_reached" and s["lastClose"]["code"] == 1013
    assert "server is full" in page.text("status") and "Trying again" in page.text("status")
    assert page.el("text").get_attribute("disabled") is not None

    holder.close()
    s = page.wait(lambda s: s["state"] == "live", 20, "admission once the slot is free")
    assert s["reconnects"] == 0 and s["connects"] == 1
    page.screenshot("voice_chat_live.png")
    page.click("start")


def test_lost_connection_reconnects_with_backoff(browser, make_server):
    srv = make_server(capacity=2)
    proxy = CuttableProxy(srv.port)
    try:
        page = browser.open(proxy.http_url)
        page.click("start")
        page.wait(lambda s: s["state"] == "live" and s["framesSent"] > 5, 20, "a live session")

        proxy.cut()  # the network goes away, and stays away for a while
        s = page.wait(lambda s: s["state"] == "reconnecting", 10, "the page to notice")
        assert s["lastClose"]["code"] == 1006
        assert "Connection lost" in page.text("status")
        page.wait(lambda s: "attempt 3" in page.text("status"), 15, "two failed reconnects, with backoff")
        assert proxy.refused >= 2
        assert page.el("text").get_attribute("disabled") is not None

        proxy.restore()
        s = page.wait(lambda s: s["state"] == "live", 20, "the page to reconnect")
        assert s["reconnects"] >= 1 and s["connects"] == 2
        assert "Reconnected" in page.text("transcript")
        frames = s["framesSent"]
        page.wait(lambda s: s["framesSent"] >= frames + 10, 10, "the microphone to stream again")
        page.click("start")
    finally:
        proxy.close()


def test_a_draining_server_says_it_is_restarting_and_the_page_comes_back(browser, make_server):
    srv = make_server(capacity=2)
    page = browser.open(srv.http_url)
    page.click("start")
    page.wait(lambda s: s["state"] == "live" and s["framesSent"] > 5, 20, "a live session")

    loop = srv.engine._live[0].loop  # the server's own asyncio loop, which runs the drain
    asyncio.run_coroutine_threadsafe(srv.app.state.drain.run(1.0), loop).result(15)
    s = page.wait(lambda s: s["state"] == "reconnecting", 10, "the page to notice the drain")
    assert s["lastClose"]["code"] == 1001 and s["lastError"] == "server_shutting_down"
    assert "server is restarting" in page.text("status") and "Connection lost" not in page.text("status")

    srv.app.state.auth.draining = False  # as if the server had been replaced: it admits sessions again
    srv.app.state.drain._task = None
    s = page.wait(lambda s: s["state"] == "live", 30, "the page to reconnect")
    assert s["connects"] == 2
    page.click("start")


def test_api_key_is_asked_for_when_the_server_needs_one(browser, make_server):
    srv = make_server(api_keys=["s3cret"])
    page = browser.open(srv.http_url)
    assert not page.visible("key-form")
    page.click("start")
    page.wait(lambda s: s["state"] == "needs-key", 20, "the key form")
    assert page.visible("key-form") and "needs an API key" in page.text("status")

    page.type("api-key", "wrong\n")
    page.wait(lambda s: s["state"] == "needs-key" and "not accepted" in page.text("status"), 20, "a wrong key refused")
    page.type("api-key", "s3cret\n")
    page.wait(lambda s: s["state"] == "live", 20, "a session with the right key")
    assert not page.visible("key-form")
    page.click("start")


def test_denied_microphone_says_how_to_allow_it(beeps, make_server):
    srv = make_server()
    driver = launch(beeps, microphone_allowed=False)
    try:
        page = Page(driver).open(srv.http_url)
        page.click("start")
        s = page.wait(lambda s: s["state"] == "mic-denied", 10, "the denial")
        assert "denied" in page.text("status") and "Allow it" in page.text("status")
        assert page.text("start") == "Start" and s["framesSent"] == 0
        assert page.el("text").get_attribute("disabled") is not None
        assert sessions(srv) == 0  # no session is opened without a microphone
    finally:
        driver.quit()


# ------------------------------------------------------------------ the resampler, on its own
RESAMPLER_CHECK = """
const done = arguments[arguments.length - 1];
import("/static/resampler.js").then(({ Resampler }) => {
  const tone = (hz, rate, n) => Float32Array.from({ length: n }, (_, i) => Math.sin(2 * Math.PI * hz * i / rate));
  const rms = (x) => Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length);
  const run = (inRate, outRate, x, chunk) => {
    const r = new Resampler(inRate, outRate), parts = [];
    for (let i = 0; i < x.length; i += chunk) parts.push(r.process(x.subarray(i, i + chunk)));
    parts.push(r.flush());
    const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0; for (const p of parts) { out.set(p, o); o += p.length; }
    return out;
  };
  const x = tone(440, 48000, 48000);
  const one = run(48000, 24000, x, x.length), chunked = run(48000, 24000, x, 128);
  let maxDiff = 0; for (let i = 0; i < one.length; i++) maxDiff = Math.max(maxDiff, Math.abs(one[i] - chunked[i]));
  // zero crossings of the 24 kHz output count its pitch
  let crossings = 0; for (let i = 1; i < chunked.length; i++) if (chunked[i - 1] < 0 && chunked[i] >= 0) crossings++;
  const up = run(24000, 44100, tone(440, 24000, 24000), 960);
  let upCrossings = 0; for (let i = 1; i < up.length; i++) if (up[i - 1] < 0 && up[i] >= 0) upCrossings++;
  const alias = run(48000, 24000, tone(15000, 48000, 48000), 128);  // above 12 kHz: must not fold down
  done({ lenOne: one.length, lenChunked: chunked.length, maxDiff, crossings, gain: rms(chunked.subarray(1000, 23000)),
         upLen: up.length, upCrossings, upGain: rms(up.subarray(2000, 42000)), aliasGain: rms(alias.subarray(1000, 23000)) });
}).catch((e) => done({ error: String(e) }));
"""


def test_resampler_keeps_pitch_and_level_streams_like_one_piece_and_does_not_alias(browser, make_server):
    srv = make_server()
    browser.open(srv.http_url)
    r = browser.driver.execute_async_script(RESAMPLER_CHECK)
    assert "error" not in r, r
    assert r["lenOne"] == r["lenChunked"] and abs(r["lenOne"] - 24000) <= 2
    assert r["maxDiff"] < 1e-5  # chunk boundaries leave no trace
    assert abs(r["crossings"] - 440) <= 1 and abs(r["upCrossings"] - 440) <= 1
    assert abs(r["upLen"] - 44100) <= 2
    assert abs(r["gain"] - 0.7071) < 0.01 and abs(r["upGain"] - 0.7071) < 0.01
    assert r["aliasGain"] < 0.01  # 15 kHz at 48 kHz is filtered out, not folded to 9 kHz
