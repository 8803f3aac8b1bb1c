"""Qwen2-VL-style models (vision/qwen2vl.py): a tiny Qwen2-VL and a tiny Qwen2.5-VL built and saved here, loaded offline, checked against
Hugging Face's own forward and ``generate`` — images of two sizes (different token counts), M-RoPE positions,
decoding after the image (rope delta), chunked prefill, and a packed batch mixing image and text requests."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from tests.vision_fixtures import tiny_tokenizer
from vision.decoder import PackedStep, Segment
from vision.model import IMAGE_PLACEHOLDER, load_vlm
from vision.qwen2vl import Qwen2VLLanguageModel
from vision.scheduler import GenRequest, SamplingParams, SchedulerConfig
from vision.service import VisionService, VisionServiceConfig

CPU = torch.device("cpu")
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def folder(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    start, end, image, video = tok.convert_tokens_to_ids(SPECIAL)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=tok.eos_token_id,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    patches = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=2)
    ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    if request.param == "qwen2_vl":
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2,
                                                                 **patches), **ids)
    else:  # Qwen2.5-VL: windowed attention in the vision tower, the same M-RoPE in the LM
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1], **patches), **ids)
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(cfg).eval()
    path = tmp_path_factory.mktemp("qwen2vl")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16).save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def vlm(folder) -> Qwen2VLLanguageModel:
    vlm = load_vlm(folder[0])
    assert isinstance(vlm, Qwen2VLLanguageModel) and vlm.decoder.config.model_type.endswith("_vl_text")
    return vlm


def images():
    a = Image.new("RGB", (56, 84), "red")  # a 4×6 patch grid after resizing: 6 tokens
    b = Image.new("RGB", (112, 56), "blue")  # 8×4: 8 tokens
    b.paste((250, 250, 0), (0, 0, 40, 30))
    return [a, b]


def hf_inputs(vlm: Qwen2VLLanguageModel, prompt) -> dict[str, torch.Tensor]:
    ids = []
    for i, piece in enumerate(prompt.pieces):
        ids += piece + ([vlm.image_token_id] * prompt.image_lengths[i] if i < len(prompt.images) else [])
    out = {"input_ids": torch.tensor([ids])}
    if prompt.images:
        out["pixel_values"], out["image_grid_thw"] = prompt.pixels
        out["mm_token_type_ids"] = (out["input_ids"] == vlm.image_token_id).int()
    return out


def ask(vlm, text: str, imgs: list[Image.Image]):
    content = " ".join([IMAGE_PLACEHOLDER] * len(imgs) + [text])
    return vlm.build_prompt([{"role": "user", "content": content}], imgs)


def test_images_of_two_sizes_take_their_own_token_counts_and_match_hf_logits(folder, vlm):
    _, hf = folder
    prompt = ask(vlm, "what colour is the square?", images())
    assert prompt.image_lengths == [6, 8] and prompt.length == prompt.positions.shape[1]
    assert not torch.equal(prompt.positions[1], prompt.positions[2])  # height and width rows differ on images
    inputs = hf_inputs(vlm, prompt)
    with torch.no_grad():
        ref = hf(**inputs).logits[0, -1]
        embeds = vlm.embed_prompt(prompt)
        whole = vlm.decoder(embeds, PackedStep.build([Segment(0, 0, prompt.length, positions=prompt.positions)], CPU),
                            vlm.decoder.new_cache(1, 128))
        # in two chunks, as the scheduler prefills a long prompt: the second continues against the cache
        cache, cut = vlm.decoder.new_cache(1, 128), 9
        vlm.decoder(embeds[:cut], PackedStep.build([Segment(0, 0, cut, positions=prompt.positions[:, :cut])], CPU), cache)
        chunked = vlm.decoder(embeds[cut:], PackedStep.build(
            [Segment(0, cut, prompt.length - cut, positions=prompt.positions[:, cut:])], CPU), cache)
        # without the M-RoPE rows (plain 0..T-1 positions) the answer differs: the test can fail
        flat = vlm.decoder(embeds, PackedStep.build([Segment(0, 0, prompt.length)], CPU), vlm.decoder.new_cache(1, 128))
    torch.testing.assert_close(whole[0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[0], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flat[0], ref, atol=1e-3)


def test_decoding_after_images_sits_at_cache_index_plus_the_rope_delta(folder, vlm):
    _, hf = folder
    prompt = ask(vlm, "what colour is the square?", images())
    assert prompt.rope_delta < 0  # the images span fewer positions than tokens
    inputs = hf_inputs(vlm, prompt)
    nxt = 42
    longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([[nxt]])], 1)}
    longer["mm_token_type_ids"] = (longer["input_ids"] == vlm.image_token_id).int()
    with torch.no_grad():
        ref = hf(**longer).logits[0, -1]
        got = {}
        for offset in (prompt.rope_delta, 0):
            cache = vlm.decoder.new_cache(1, 128)
            vlm.decoder(vlm.embed_prompt(prompt), PackedStep.build([Segment(0, 0, prompt.length,
                                                                            positions=prompt.positions)], CPU), cache)
            step = PackedStep.build([Segment(0, prompt.length, 1, offset)], CPU)
            got[offset] = vlm.decoder(vlm.embed_tokens(torch.tensor([nxt])), step, cache)[0]
    torch.testing.assert_close(got[prompt.rope_delta], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], ref, atol=1e-3)  # at the plain cache index it would be wrong


def _serve(vlm, prompts, max_tokens: int) -> list[list[int]]:
    service = VisionService(vlm, VisionServiceConfig(lora_slots=1, max_lora_rank=8, scheduler=SchedulerConfig(
        max_running=4, max_len=128, max_prefill_tokens=16)))  # 16: the image prompts prefill in chunks
    done, finished = threading.Event(), []

    def emit(ev):
        if ev.kind in ("done", "error"):
            finished.append(ev)
            if len(finished) == len(prompts):
                done.set()

    reqs = [GenRequest(f"r{i}", None, p, SamplingParams(max_tokens=max_tokens, stop=()), emit)
            for i, p in enumerate(prompts)]
    service.scheduler.start()
    try:
        for r in reqs:
            service.scheduler.submit(r)
        assert done.wait(60), "requests did not finish"
    finally:
        service.scheduler.stop()
    assert all(ev.kind == "done" for ev in finished), finished
    return [r.out_ids for r in reqs]


def test_a_packed_batch_of_image_and_text_requests_decodes_as_hf_generate(folder, vlm):
    _, hf = folder
    prompts = [ask(vlm, "what colour?", images()[:1]), ask(vlm, "how many circles are there?", []),
               ask(vlm, "is it red or blue?", images()[::-1])]
    got = _serve(vlm, prompts, max_tokens=6)
    for prompt, ids in zip(prompts, got, strict=True):
        inputs = hf_inputs(vlm, prompt)
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None,
                              pad_token_id=0)
        assert ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_unsupported_model_types_are_refused_by_name(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qwen2_vl"):
        load_vlm(tmp_path)


def test_served_through_the_openai_client_with_the_prompt_length_in_the_usage(folder, make_server):
    import base64
    import io

    import openai

    vlm = load_vlm(folder[0])  # a fresh copy: a service wraps the model's layers for LoRA
    service = VisionService(vlm, VisionServiceConfig(lora_slots=1, max_lora_rank=8,
                                                     scheduler=SchedulerConfig(max_running=2, max_len=128)))
    srv = make_server(vision=service)
    client = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="x", max_retries=0, timeout=60)
    buf = io.BytesIO()
    images()[1].save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour?"}]
    r = client.chat.completions.create(model=vlm.name, messages=[{"role": "user", "content": content}], max_tokens=4)
    expected = ask(vlm, "what colour?", images()[1:])
    assert r.usage.prompt_tokens == expected.length and r.usage.completion_tokens >= 1
