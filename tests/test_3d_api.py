"""3D questions through the one app: a point cloud as a content part, gated prefill in the scheduler."""

from __future__ import annotations

import base64
import copy
import io

import numpy as np
import openai
import pytest
import torch

from tests.test_3d_model import ECFG
from tests.test_vision_serving import make_service
from tests.vision_fixtures import save_adapters, tiny_llama, tiny_tokenizer
from vision.decoder import PackedDecoder
from vision.encoder3d import SpatialTokenizer
from vision.gate3d import GatePolicy
from vision.model3d import PointLanguageModel
from vision.scheduler import SchedulerConfig
from vision.service import VisionService, VisionServiceConfig


def make_point_service() -> VisionService:
    """The tiny 3D model served as ``tiny-3d``, gated to half its spatial tokens after layer 1."""
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok))
    torch.manual_seed(0)
    model = PointLanguageModel("tiny-3d", PackedDecoder(copy.deepcopy(lm)), tok, SpatialTokenizer(ECFG).eval(),
                               {tok.eos_token_id})
    gate = GatePolicy(stages=((1, 0.5),))
    return VisionService(model, VisionServiceConfig(lora_slots=1, max_lora_rank=8, gate=gate,
                                                    scheduler=SchedulerConfig(max_running=4, max_len=256)))


@pytest.fixture(scope="module")
def point_service():
    return make_point_service()


def npy_url(seed: int = 0, n: int = 400) -> str:
    rng = np.random.default_rng(seed)
    arr = np.concatenate([rng.uniform(-1, 1, (n, 3)), rng.uniform(0, 1, (n, 3))], 1).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    return "data:application/octet-stream;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, model, url, **extra):
    content = [{"type": "text", "text": "how many boxes?"}, {"type": "point_cloud_url", "point_cloud_url": {"url": url}}]
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=5, **extra)


def test_a_point_cloud_question_is_answered_with_the_gate_counted(make_server, point_service, tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    vision = make_service((tok, base, save_adapters(base, tmp_path), None), slots=2)
    srv = make_server(vision=[vision, point_service])
    client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="x", max_retries=0, timeout=60)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny-3d"].input_modalities == ["text", "point_cloud"]  # what each model takes, for clients
    assert cards["tiny"].input_modalities == cards["ad-a"].input_modalities == ["text", "image"]
    gated = ask(client, "tiny-3d", npy_url())
    assert gated.usage.spatial_tokens_total == 12 and gated.usage.spatial_tokens_kept == 6
    assert gated.choices[0].message.content is not None
    # "default" with a point cloud goes to the model that takes clouds; the gate can be switched off per request
    full = ask(client, "default", npy_url(), extra_body={"spatial_gate": "none"})
    assert full.usage.prompt_tokens == gated.usage.prompt_tokens
    assert getattr(full.usage, "spatial_tokens_kept", None) is None  # not gated: nothing pruned, nothing counted
    fastv = ask(client, "tiny-3d", npy_url(), extra_body={"spatial_gate": "fastv"})
    assert fastv.usage.spatial_tokens_kept == 6  # FastV's default prunes half after layer 2
    with pytest.raises(openai.BadRequestError) as e:  # the image model refuses clouds, by name
        ask(client, "tiny", npy_url())
    assert e.value.body["code"] == "point_clouds_not_supported"
    for bad, code in ((npy_url(n=5), "point_cloud_too_small"), ("data:application/octet-stream;base64,@@", "invalid_point_cloud"),
                      ("data:application/octet-stream;base64,AAAA", "invalid_point_cloud"),
                      ("https://example.com/a.ply", "invalid_point_cloud_url")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "tiny-3d", bad)
        assert e.value.body["code"] == code, e.value.body
    assert ask(client, "tiny-3d", npy_url(1)).choices[0].finish_reason in ("stop", "length")  # still serving
