"""Model loading for serving: the packed decoder equals Hugging Face's forward; a LLaVA folder loads offline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.vision_fixtures import tiny_tokenizer
from vision.decoder import PackedDecoder, PackedStep, Segment
from vision.model import IMAGE_PLACEHOLDER, load_vlm

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_prefill_chunks_and_decode_equal_the_hf_forward(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    m = model_cls(cfg_cls(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    dec, cache = PackedDecoder(m), None
    cache = dec.new_cache(4, 64)
    a, b = torch.randint(0, 100, (7,)), torch.randint(0, 100, (5,))
    with torch.no_grad():
        ref_a, ref_b = m(a[None]).logits[0], m(b[None]).logits[0]
        # two prompts prefilled together (b only partly), then a decode beside b's second chunk, then a decode
        steps = [([Segment(2, 0, 5), Segment(0, 0, 3)], torch.cat([a[:5], b[:3]]), [ref_a[4], ref_b[2]]),
                 ([Segment(2, 5, 1), Segment(0, 3, 2)], torch.cat([a[5:6], b[3:5]]), [ref_a[5], ref_b[4]]),
                 ([Segment(2, 6, 1)], a[6:7], [ref_a[6]])]
        for segs, ids, want in steps:
            out = dec(dec.embed_tokens(ids), PackedStep.build(segs, CPU), cache)
            for row, w in enumerate(want):
                torch.testing.assert_close(out[row], w, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="unsupported language model"):
        PackedDecoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_llava_folder_loads_offline_and_matches_hf(tmp_path):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=image_id, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)

    vlm = load_vlm(tmp_path)
    assert vlm.encoder.tokens_per_image == 16
    image = Image.new("RGB", (40, 40), "red")
    prompt = vlm.build_prompt([{"role": "user", "content": f"what colour {IMAGE_PLACEHOLDER}"}], [image])
    ids = prompt.pieces[0] + [image_id] * prompt.tokens_per_image + prompt.pieces[1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
        out = vlm.decoder(vlm.embed_prompt(prompt), PackedStep.build([Segment(0, 0, len(ids))], CPU),
                          vlm.decoder.new_cache(1, 128))
    torch.testing.assert_close(out[0], ref.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_missing_model_folder_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="no download"):
        load_vlm(tmp_path / "nowhere")
