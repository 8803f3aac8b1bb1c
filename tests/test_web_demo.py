"""The Gradio demos at /demo (web/demo.py), driven through ``gradio_client`` against the real server.

One server for the module, on loopback, with the tiny random voice model and a tiny vision service built
here (a 2-layer Llama, a toy image encoder, peft adapters): the demo calls that server back over its public
API, so every answer below went through ``/v1/models``, ``/v1/chat/completions`` (SSE) or ``/v1/realtime``.
The tiny models' answers are gibberish; asserted is that they arrive, equal what the API itself answers,
and that refusals reach the page as messages. One test (slow) opens the demo in headless Chromium; its
screenshot goes to artifacts/web/demo.png, and with ``SAVE_SCREENSHOTS=1`` to docs/demo.png too (the one in
the repository was taken against ``python -m realtime serve`` and its default models).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realtime.config import Settings
from tests.conftest import start_server, tiny_model
from tests.test_3d_api import make_point_service as tiny_point_service
from tests.test_vision_serving import make_service
from tests.vision_fixtures import save_adapters, tiny_llama, tiny_tokenizer
from web import demo_points as points
from web.demo import NOT_A_3D_MODEL, NOT_SERVED_3D, self_url

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
DOCS = Path(__file__).resolve().parents[1] / "docs"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"


def _client(url: str, tmp: Path):
    from gradio_client import Client

    return Client(f"{url}/demo/", verbose=False, analytics_enabled=False, download_files=str(tmp))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    paths = save_adapters(base, tmp_path_factory.mktemp("adapters"))
    service = make_service((tok, base, paths, None), slots=2)
    srv = start_server(Settings(demo=True, capacity=4), tiny_model(4), None, [service, tiny_point_service()])
    tmp = tmp_path_factory.mktemp("demo")
    try:
        yield srv, _client(srv.http_url, tmp), tmp
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "square.png"
    img = Image.new("RGB", (48, 48), "white")
    img.paste((220, 30, 30), (12, 12, 36, 36))
    img.save(path)
    return path


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def test_demo_is_mounted_as_html_only_when_asked(served, make_server):
    srv, _, _ = served
    with urllib.request.urlopen(f"{srv.http_url}/demo/", timeout=10) as r:
        assert r.status == 200 and "text/html" in r.headers["content-type"]
        assert "gradio" in r.read().decode().lower()
    with urllib.request.urlopen(f"{srv.http_url}/healthz", timeout=10) as r:  # the server's own routes are intact
        assert json.load(r) == {"status": "ok"}
    plain = make_server()  # create_app's default: no demo
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{plain.http_url}/demo/", timeout=10)
    assert e.value.code == 404


def test_model_list_names_the_base_model_and_the_adapters(served):
    _, client, _ = served
    vision_model, model_3d, note = client.predict("", None, None, api_name="/refresh_models")
    # updates: the choices and the value picked; each tab lists the models that take its input
    assert [c[0] for c in vision_model["choices"]] == ["tiny", "ad-a", "ad-b", "ad-c"] and vision_model["value"] == "tiny"
    assert [c[0] for c in model_3d["choices"]] == ["tiny-3d"] and model_3d["value"] == "tiny-3d"
    assert "`tiny` (base)" in note and "`tiny-3d` (base, 3D)" in note and "`ad-a` (LoRA rank 4)" in note and "`ad-b` (LoRA rank 8)" in note


def test_vision_tab_streams_the_answer_the_api_gives(served, png):
    srv, client, _ = served
    from gradio_client import handle_file

    job = client.submit(handle_file(str(png)), "ad-a", "what colour is the square?", 8, "", api_name="/ask_vision")
    answer, info = job.result(timeout=120)
    assert answer and "8 answer tokens" in info, info  # gibberish (newlines, here), but an answer
    assert len(job.outputs()) >= 3  # "asking", then partial answers as they stream
    img = Image.open(png).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    direct = post_json(f"{srv.http_url}/v1/chat/completions", {
        "model": "ad-a", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour is the square?"}]}]})
    assert answer == direct["choices"][0]["message"]["content"]  # greedy: the demo adds nothing, loses nothing


def test_vision_tab_shows_the_servers_error_message(served, png):
    _, client, _ = served
    from gradio_client import handle_file

    answer, info = client.predict(handle_file(str(png)), "no-such-adapter", "hi", 8, "", api_name="/ask_vision")
    assert answer == "" and "no model or adapter named 'no-such-adapter'" in info and "model_not_found" in info
    assert "Traceback" not in info


def test_3d_tab_renders_examples_and_uploads(served, tmp_path):
    _, client, _ = served
    from gradio_client import handle_file

    cleared, fig, caption = client.predict("sphere", api_name="/show_example")
    assert cleared is None and "scatter3d" in json.dumps(fig) and "4,096 points" in caption
    _, fig, caption = client.predict("test scene 1", api_name="/show_example")  # a held-out scene of vision.scene3d
    assert "1,024 points" in caption and "How many objects are there?* → four" in caption
    np.save(tmp_path / "line.npy", np.stack([np.linspace(0, 1, 50)] * 3, 1))
    fig, caption = client.predict(handle_file(str(tmp_path / "line.npy")), "cube", api_name="/show_upload")
    assert "scatter3d" in json.dumps(fig) and "50 points" in caption
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    _, caption = client.predict(handle_file(str(tmp_path / "bad.npy")), "cube", api_name="/show_upload")
    assert "Cannot read this file" in caption


def test_3d_tab_answers_with_the_gates_count_as_the_api_does(served, tmp_path):
    srv, client, _ = served
    from gradio_client import handle_file

    cloud = points.example("two boxes")
    (tmp_path / "boxes.ply").write_bytes(points.to_ply(cloud))
    answer, info = client.predict(handle_file(str(tmp_path / "boxes.ply")), "cube", "tiny-3d", "how many boxes?", 6,
                                  "", api_name="/ask_points")
    # the same question straight to the API: greedy decoding, so the same words and the same gate counts
    body = post_json(f"{srv.http_url}/v1/chat/completions", {
        "model": "tiny-3d", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "how many boxes?"},
            {"type": "point_cloud_url", "point_cloud_url": {"url": points.data_url(points.read_ply(points.to_ply(cloud)))}}]}]})
    usage = body["usage"]
    assert usage["spatial_tokens_total"] == 12 and usage["spatial_tokens_kept"] == 6
    assert answer == body["choices"][0]["message"]["content"]
    assert f"spatial tokens kept: {usage['spatial_tokens_kept']} of {usage['spatial_tokens_total']}" in info, info
    # "default" with a cloud reaches the model that takes clouds; the image model refuses it and the tab says so
    answer, info = client.predict(None, "two boxes", None, "how many boxes?", 4, "", api_name="/ask_points")
    assert "spatial tokens kept: 6 of 12" in info, info
    answer, info = client.predict(None, "two boxes", "tiny", "how many boxes?", 8, "", api_name="/ask_points")
    assert answer == "" and NOT_A_3D_MODEL in info and "point_clouds_not_supported" not in info, info


def test_voice_tab_speaks_typed_text_and_streams_a_recording_as_the_microphone(served, tmp_path):
    _, client, _ = served
    from gradio_client import handle_file

    audio, info = client.predict("hello there", None, 1, "", api_name="/speak")
    with wave.open(audio, "rb") as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0
    assert "s of audio" in info and "status `" in info, info
    wav = tmp_path / "mic.wav"  # 16 kHz: the demo resamples it to the wire's 24 kHz
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.2 * np.sin(np.arange(8000) * 2 * np.pi * 300 / 16000) * 32767).astype("<i2").tobytes())
    audio, info = client.predict("again", handle_file(str(wav)), 1, "", api_name="/speak")
    assert audio and "s of audio" in info, info


def test_without_vision_the_demo_says_the_api_is_not_served(make_server, tmp_path):
    srv = make_server(demo=True)
    client = _client(srv.http_url, tmp_path)
    _, _, note = client.predict("", None, None, api_name="/refresh_models")
    assert "not served" in note and "404" in note
    answer, info = client.predict(None, "cube", None, "what is it?", 8, "", api_name="/ask_points")
    assert answer == "" and NOT_SERVED_3D in info


def test_a_server_with_keys_refuses_the_demo_without_one(make_server, tmp_path):
    srv = make_server(demo=True, api_keys=["sekrit"])
    client = _client(srv.http_url, tmp_path)
    _, info = client.predict("hello", None, 1, "", api_name="/speak")
    assert "HTTP 401" in info
    audio, info = client.predict("hello", None, 1, "sekrit", api_name="/speak")
    assert audio and "s of audio" in info


# ------------------------------------------------------------------ point clouds, no server


def test_point_cloud_files_round_trip(tmp_path):
    cloud = points.example("two boxes", n=300)
    assert len(cloud) == 300 and cloud.rgb is not None
    back = points.read_ply(points.to_ply(cloud))
    np.testing.assert_array_equal(back.xyz, cloud.xyz)
    np.testing.assert_array_equal(back.rgb, cloud.rgb)
    url = points.data_url(cloud)
    assert url.startswith("data:application/octet-stream;base64,")
    assert points.read_ply(base64.b64decode(url.split(",", 1)[1])).xyz.shape == (300, 3)
    xyz = cloud.xyz[:5].astype(np.float64)
    ascii_ply = "ply\nformat ascii 1.0\nelement vertex 5\nproperty double x\nproperty double y\nproperty double z\n" \
                "element face 0\nproperty list uchar int vertex_indices\nend_header\n" + \
                "\n".join(" ".join(f"{v:.9g}" for v in row) for row in xyz) + "\n"
    np.testing.assert_allclose(points.read_ply(ascii_ply.encode()).xyz, xyz, rtol=1e-6)
    rgb = (255 << 16) | (128 << 8) | 7
    pcd_head = "# .PCD v0.7\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F {t}\nCOUNT 1 1 1 1\n" \
               "WIDTH 2\nHEIGHT 1\nPOINTS 2\nDATA {kind}\n"
    body = np.zeros(2, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])
    body["x"], body["rgb"] = [1, 2], rgb
    pcd = points.read_pcd(pcd_head.format(t="U", kind="binary").encode() + body.tobytes())
    assert pcd.xyz[:, 0].tolist() == [1, 2] and pcd.rgb[0].tolist() == [255, 128, 7]
    pcd = points.read_pcd((pcd_head.format(t="U", kind="ascii") + f"1 0 0 {rgb}\n2 0 0 {rgb}\n").encode())
    assert pcd.xyz[:, 0].tolist() == [1, 2] and pcd.rgb[1].tolist() == [255, 128, 7]
    np.save(tmp_path / "c.npy", np.concatenate([cloud.xyz, cloud.rgb / 255.0], 1))
    loaded = points.load(tmp_path / "c.npy")
    np.testing.assert_array_equal(loaded.xyz, cloud.xyz)
    assert np.abs(loaded.rgb.astype(int) - cloud.rgb).max() <= 1


@pytest.mark.parametrize("name,data,says", [
    ("a.ply", b"not a ply", "not a PLY"),
    ("a.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 9\nproperty float x\nproperty float y\n"
              b"property float z\nend_header\n" + b"\0" * 12, "truncated"),
    ("a.pcd", b"VERSION 0.7\n", "not a PCD"),
    ("a.npy", None, "shape (N, 3) or (N, 6)"),
    ("a.txt", b"1 2 3", "upload a .ply, .pcd or .npy"),
])
def test_unreadable_point_clouds_say_why(tmp_path, name, data, says):
    path = tmp_path / name
    if data is None:
        np.save(path, np.zeros((4, 2)))
    else:
        path.write_bytes(data)
    with pytest.raises(points.PointCloudError, match=None) as e:
        points.load(path)
    assert says in str(e.value)


def test_self_url_reaches_a_wildcard_bind_over_loopback():
    assert self_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert self_url("::1", 80) == "http://[::1]:80"
    assert self_url("10.0.0.5", 9) == "http://10.0.0.5:9"


# ------------------------------------------------------------------ in a real browser


@pytest.mark.slow
def test_the_demo_answers_in_a_real_browser(served, png):
    """Headless Chromium: the page lists the models, takes an uploaded image, streams the answer.
    Screenshot: artifacts/web/demo.png, and docs/demo.png with SAVE_SCREENSHOTS=1."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        reason = "Chromium and chromedriver are needed: run scripts/system-deps.sh"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    srv, _, _ = served
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1040",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(f"{srv.http_url}/demo/")

        def wait_for(what, check, timeout=60):
            deadline = time.monotonic() + timeout
            while not check():
                if time.monotonic() > deadline:
                    driver.save_screenshot(str(ARTIFACTS / "demo_timeout.png"))
                    raise AssertionError(f"timed out waiting for {what}; screenshot {ARTIFACTS / 'demo_timeout.png'}")
                time.sleep(0.2)

        text = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        wait_for("the model list", lambda: "(LoRA rank 8)" in text())
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(png))
        wait_for("the image", lambda: driver.find_elements(By.CSS_SELECTOR, "img[src*='square']"))
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Ask").click()
        wait_for("the answer", lambda: "64 answer tokens" in text())
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        driver.save_screenshot(str(ARTIFACTS / "demo.png"))
        if os.environ.get("SAVE_SCREENSHOTS"):
            shutil.copy(ARTIFACTS / "demo.png", DOCS / "demo.png")
    finally:
        driver.quit()
