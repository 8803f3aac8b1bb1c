"""The OpenAI-compatible vision API over a real socket, driven by the official ``openai`` package."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from tests.conftest import free_port
from tests.test_vision_serving import make_service
from tests.vision_fixtures import peft_reference, save_adapters, tiny_llama, tiny_tokenizer
from vision.api import build_router


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    folder = tmp_path_factory.mktemp("adapters")
    paths = save_adapters(base, folder)
    world = (tok, base, paths, peft_reference(base, paths))
    service = make_service(world, slots=2)
    service.adapters.unregister("ad-c")  # loaded at run time by a test
    app = FastAPI()
    app.include_router(build_router(service, default_max_tokens=8))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    service.start()
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, service, paths, port
    srv.should_exit = True
    thread.join(10)
    service.stop()


def data_url(color: str, size: int = 16, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, model: str, image: str | None = None, **kw):
    content = [{"type": "text", "text": "what colour is the square?"}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_models_list_base_and_adapters(server):
    client, service, _, _ = server
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == service.model.name and {"ad-a", "ad-b"} <= set(ids)


def test_chat_is_deterministic_and_adapters_and_images_change_it(server):
    client, service, _, _ = server
    one = ask(client, "tiny", data_url("red"))
    assert one.choices[0].message.content == ask(client, "tiny", data_url("red")).choices[0].message.content
    assert one.usage.completion_tokens >= 1 and one.usage.prompt_tokens > 8
    answers = {ask(client, m, data_url(c)).choices[0].message.content for m in ("tiny", "ad-a", "ad-b")
               for c in ("red", "blue")}
    assert len(answers) > 1  # a random tiny model, but adapters and images must reach the computation


def test_streaming_equals_the_whole_answer(server):
    client, _, _, _ = server
    whole = ask(client, "ad-b", data_url("green")).choices[0].message.content
    stream = ask(client, "ad-b", data_url("green"), stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole and finish in ("stop", "length") and usage.completion_tokens >= 1


def test_concurrent_requests_of_different_adapters(server):
    client, service, _, _ = server
    alone = {m: ask(client, m).choices[0].message.content for m in ("tiny", "ad-a", "ad-b")}
    results: dict[int, str] = {}

    def run(i, m):
        results[i] = ask(client, m).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(["tiny", "ad-a", "ad-b"] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, m in enumerate(["tiny", "ad-a", "ad-b"] * 3):
        assert results[i] == alone[m]  # batching with other adapters changes nothing (greedy)


def test_load_and_unload_adapter_at_run_time(server):
    client, _, paths, port = server
    base = f"http://127.0.0.1:{port}/v1"
    body = json.dumps({"name": "ad-c", "path": str(paths["ad-c"])}).encode()
    req = urllib.request.Request(f"{base}/adapters", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert json.load(r)["rank"] == 2
    assert "ad-c" in [m.id for m in client.models.list().data]
    assert ask(client, "ad-c").choices[0].message.content is not None
    with pytest.raises(urllib.error.HTTPError) as e:  # same name again
        urllib.request.urlopen(urllib.request.Request(f"{base}/adapters", body, {"Content-Type": "application/json"}))
    assert e.value.code == 409 and json.load(e.value)["error"]["code"] == "adapter_exists"
    with urllib.request.urlopen(urllib.request.Request(f"{base}/adapters/ad-c", method="DELETE")) as r:
        assert json.load(r)["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        ask(client, "ad-c")


@pytest.mark.parametrize("case,code", [
    ("unknown_model", "model_not_found"),
    ("bad_image", "invalid_image"),
    ("not_image_url", "invalid_image_url"),
    ("remote_url", "invalid_image_url"),
    ("too_many_images", "too_many_images"),
    ("context", "context_length_exceeded"),
    ("bad_part", "invalid_request"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, case, code):
    client, _, _, _ = server
    msgs = [{"role": "user", "content": "hi"}]
    model, extra = "tiny", {}
    if case == "unknown_model":
        model = "no-such-adapter"
    elif case == "bad_image":
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    elif case == "not_image_url":
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,AAAA"}}]}]
    elif case == "remote_url":
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    elif case == "too_many_images":
        part = {"type": "image_url", "image_url": {"url": data_url("red")}}
        msgs = [{"role": "user", "content": [part] * 5}]
    elif case == "context":
        extra = {"max_tokens": 10_000}
    elif case == "bad_part":
        msgs = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=msgs, **extra)
    assert e.value.status_code in (400, 404)
    assert e.value.body["code"] == code, e.value.body
    assert ask(client, "ad-a").choices[0].message.content is not None  # nothing else affected


def test_malformed_json_and_fields(server):
    _, _, _, port = server
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    for body in (b"{not json", json.dumps({"model": "tiny"}).encode(),
                 json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
                 json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode()):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}))
        err = json.load(e.value)["error"]
        assert e.value.code == 400 and err["type"] == "invalid_request_error" and err["message"]


def test_served_by_the_one_app_behind_its_api_keys(make_server, tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    paths = save_adapters(base, tmp_path)
    service = make_service((tok, base, paths, None), slots=2)
    srv = make_server(vision=service, api_keys=["sesame"])
    url = f"{srv.http_url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0, timeout=60)
    assert "ad-b" in [m.id for m in client.models.list().data]
    answer = ask(client, "ad-b", data_url("red"))
    assert answer.choices[0].finish_reason in ("stop", "length")
    with urllib.request.urlopen(f"{srv.http_url}/readyz") as r:  # the voice side runs beside it
        assert json.load(r)["ready"] is True


def test_vision_metrics_are_exported(make_server, tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    service = make_service((tok, base, save_adapters(base, tmp_path), None), slots=2)
    srv = make_server(vision=service)
    client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="x", max_retries=0, timeout=60)
    ask(client, "ad-a")
    with urllib.request.urlopen(f"{srv.http_url}/metrics") as r:
        text = r.read().decode()
    assert "vision_tokens_generated_total" in text and "vision_adapter_loads_total 1.0" in text
    assert 'vision_requests_finished_total{reason="' in text
