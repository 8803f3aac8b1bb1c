"""The 3D LMM with a tiny Llama and tokenizer built here: prompt splicing, spans, gated generation, weights files,
LoRA merging equal to peft's, and the training batch's answer-row alignment."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.vision_fixtures import tiny_llama, tiny_tokenizer
from vision.decoder import PackedDecoder
from vision.encoder3d import Encoder3DConfig, SpatialTokenizer
from vision.gate3d import GatePolicy, generate
from vision.model3d import (
    POINTS_PLACEHOLDER,
    PointLanguageModel,
    load_spatial,
    merge_lora,
    question_messages,
    save_lora,
    save_spatial,
)
from vision.points import Cloud

ECFG = Encoder3DConfig(n_points=128, n_patches=12, patch_size=16, dim=32, layers=1, heads=2, lm_dim=64)


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok))
    torch.manual_seed(0)
    return tok, lm, SpatialTokenizer(ECFG).eval()


@pytest.fixture(scope="module")
def model(parts):
    tok, lm, spatial = parts
    return PointLanguageModel("tiny", PackedDecoder(lm), tok, spatial, {tok.eos_token_id})


def clouds(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [torch.cat([torch.rand(128, 3, generator=g) * 2 - 1, torch.rand(128, 3, generator=g)], 1) for _ in range(n)]


def test_prompt_spans_and_embedding(model):
    c = clouds(2)
    msgs = [{"role": "user", "content": f"{POINTS_PLACEHOLDER}\nwhat colour? and {POINTS_PLACEHOLDER} here"}]
    p = model.build_prompt(msgs, c)
    assert p.length == sum(map(len, p.pieces)) + 2 * ECFG.n_patches
    spans = p.spatial_spans()
    assert [e - s for s, e in spans] == [ECFG.n_patches] * 2 and spans[0][0] == len(p.pieces[0])
    emb = model.embed_prompt(p)
    assert emb.shape == (p.length, 64)
    sp = model.encode_clouds(c)
    torch.testing.assert_close(emb[spans[1][0]:spans[1][1]], sp[1])
    with pytest.raises(ValueError):
        model.build_prompt(msgs, c[:1])


def test_raw_clouds_are_normalised_and_resampled(model):
    import numpy as np

    raw = Cloud((np.random.default_rng(0).normal(size=(300, 3)) * 5 + 2).astype(np.float32),
                np.full((300, 3), 0.5, np.float32))
    t = model.prepare_cloud(raw)
    assert t.shape == (128, 6) and float(t[:, :3].norm(dim=1).max()) <= 1.0 + 1e-5


def test_gated_generation_runs_and_keep_one_matches(model):
    p = model.question_prompt("what colour is the sphere?", clouds(1)[0])
    full = generate(model, p, None, model.decoder.new_cache(1, 128), max_new_tokens=4)
    same = generate(model, p, GatePolicy(((1, 1.0),)), model.decoder.new_cache(1, 128), max_new_tokens=4)
    pruned = generate(model, p, GatePolicy.fastv(1, 0.5), model.decoder.new_cache(1, 128), max_new_tokens=4)
    assert full == same and 1 <= len(pruned) <= 4


def test_spatial_weights_round_trip(tmp_path, parts):
    spatial = parts[2]
    save_spatial(tmp_path / "s.safetensors", spatial, half=False)
    back = load_spatial(tmp_path / "s.safetensors")
    assert back.cfg == ECFG and back.trained
    x = torch.stack(clouds(2))
    torch.testing.assert_close(back(x), spatial(x))


def test_merge_lora_equals_peft(tmp_path, parts):
    from peft import LoraConfig, get_peft_model

    from vision.train3d import lora_weights

    _, lm, _ = parts
    peft_lm = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    save_lora(tmp_path / "l.safetensors", {k: (a.half().float(), b.half().float()) for k, (a, b) in lora_weights(peft_lm).items()}, 4, 8)
    merged = copy.deepcopy(lm)
    assert merge_lora(merged, tmp_path / "l.safetensors") == 2 * lm.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        ref = peft_lm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)  # fp16-stored A/B


def test_training_batch_predicts_the_answer_tokens(parts):
    """The rows lm_batch marks are exactly those whose next input is the answer (teacher forcing), for a single
    question and for a chat of follow-up questions about one scene."""
    from vision.scene3d import Example
    from vision.train3d import encode_conversation, encode_examples, lm_batch

    tok, lm, spatial = parts
    tok = copy.copy(tok)
    exs = [Example(0, "colour", "what colour is the square?", "red"), Example(0, "count", "how many?", "two")]
    encs = [encode_examples(tok, exs[:1])[0], encode_conversation(tok, exs)]
    assert len(encs[1].turns) == 2 and encs[1].prefix == encs[0].prefix and encs[1].turns[0] == encs[0].turns[0]
    x, mask, rows, tgt = lm_batch(lm, spatial, torch.stack(clouds(2)), encs, torch.float32)
    assert x.shape[0] == 2 and mask.sum(1).tolist() == [e.length + ECFG.n_patches - 1 for e in encs]
    assert tgt.tolist() == [t for e in encs for _, a in e.turns for t in a]
    emb = lm.get_input_embeddings().weight
    for (b, r), t in zip(rows.tolist(), tgt.tolist(), strict=True):
        if r + 1 < int(mask[b].sum()):  # the next input row is the target token's embedding
            torch.testing.assert_close(x[b, r + 1], emb[t])
    assert tgt.tolist()[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    follow_up = tok.decode(encs[1].turns[1][0])
    assert "how many?" in follow_up and POINTS_PLACEHOLDER not in follow_up
    with pytest.raises(ValueError, match="same scene"):
        encode_conversation(tok, [exs[0], Example(1, "count", "how many?", "two")])
    text = tok.apply_chat_template(question_messages("q"), tokenize=False, add_generation_prompt=True)
    assert POINTS_PLACEHOLDER in text


def test_schedule_ends_low_whether_steps_or_minutes_run_out():
    from vision.train3d import schedule

    assert schedule(0, 100, 0.0, 60.0) == pytest.approx(0.1)  # warm-up
    assert schedule(50, 100, 1.0, 60.0) == pytest.approx(0.5)  # half the steps
    assert schedule(50, 100, 30.0, 60.0) == pytest.approx(0.5)  # half the minutes
    assert schedule(10, 100, 59.9, 60.0) < 1e-4  # the time budget is nearly spent: near zero, not near the peak
    assert schedule(99, 100, 1.0, 60.0) < 1e-3


def test_scene_batches_cover_every_scene_with_its_own_questions():
    from vision.scene3d import Example
    from vision.train3d import scene_batches

    exs = [Example(s, "k", f"q{s}{i}", "a") for s in range(10) for i in range(3)]
    batches = scene_batches(exs, batch=2, turns=2, seed=0)
    epoch = [next(batches) for _ in range(5)]
    scenes = [exs[chat[0]].scene for b in epoch for chat in b]
    assert sorted(scenes) == list(range(10))  # every scene once per epoch
    for b in epoch:
        for chat in b:
            assert len(chat) == 2 and len(set(chat)) == 2 and len({exs[j].scene for j in chat}) == 1


def test_resume_restores_the_lora(parts):
    from peft import LoraConfig, get_peft_model

    from vision.train3d import load_lora_weights, lora_weights

    _, lm, _ = parts
    trained = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    fresh = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    load_lora_weights(fresh, lora_weights(trained))
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_init_from_exported_weights(tmp_path, parts):
    """``train3d --init DIR`` starts from exported files: the fp16 round trip restores the spatial tokenizer and the
    LoRA (same logits as the trained model), and a missing file or another patch layout or rank fails up front."""
    from peft import LoraConfig, get_peft_model

    from vision.train3d import Train3DConfig, init_state, load_lora_weights, lora_weights

    _, lm, spatial = parts
    trained = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    with pytest.raises(FileNotFoundError, match="lora.safetensors"):
        save_spatial(tmp_path / "spatial.safetensors", spatial)
        init_state(tmp_path, Train3DConfig(n_patches=ECFG.n_patches, patch_size=ECFG.patch_size))
    save_lora(tmp_path / "lora.safetensors", lora_weights(trained), 4, 8)
    cfg = Train3DConfig(n_patches=ECFG.n_patches, patch_size=ECFG.patch_size, lora_rank=4, lora_alpha=8.0)
    state = init_state(tmp_path, cfg)
    back = SpatialTokenizer(ECFG).eval()
    back.load_state_dict(state["spatial"])
    x = torch.stack(clouds(2))
    torch.testing.assert_close(back(x), spatial(x), rtol=1e-2, atol=1e-2)  # fp16-stored
    fresh = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    load_lora_weights(fresh, state["lora"])
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="patches"):
        init_state(tmp_path, Train3DConfig(n_patches=2 * ECFG.n_patches, patch_size=ECFG.patch_size,
                                           lora_rank=4, lora_alpha=8.0))
    with pytest.raises(ValueError, match="rank 4"):
        init_state(tmp_path, Train3DConfig(n_patches=ECFG.n_patches, patch_size=ECFG.patch_size))


def test_gate_aware_training_batch(parts):
    """Gate-aware fine-tuning on a real training batch: the scoring row is the row that predicts the first answer
    token (the served prompt's last token), survivors follow the policy, the loss through the gate differs from the
    plain one and trains the LoRA, and a batch with no sequence drawn is the plain loss."""
    from peft import LoraConfig, get_peft_model

    from vision.scene3d import Example
    from vision.train3d import encode_conversation, gate_masks, lm_batch, lm_loss

    tok, lm, spatial = parts
    peft_lm = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    exs = [Example(0, "colour", "what colour is the square?", "red"), Example(0, "count", "how many?", "two"),
           Example(1, "count", "how many squares are there?", "three")]
    encs = [encode_conversation(tok, exs[:2]), encode_conversation(tok, exs[2:])]
    x, mask, rows, tgt = lm_batch(peft_lm, spatial, torch.stack(clouds(2)), encs, torch.float32)
    policy = GatePolicy(((1, 0.5),))
    assert gate_masks(peft_lm, policy, encs, x, mask, ECFG.n_patches, torch.tensor([False, False])) is None
    masks = gate_masks(peft_lm, policy, encs, x, mask, ECFG.n_patches, torch.tensor([True, False]))
    first_rows = [int(rows[rows[:, 0] == b][0, 1]) for b in range(2)]
    assert masks.batch.last_prompt.tolist() == first_rows
    assert masks.batch.spatial == (len(encs[0].prefix), len(encs[0].prefix) + ECFG.n_patches)
    assert [int(a.sum()) for a in masks.alive[-1]] == [6, 12]  # the gated chat keeps 50%, the other everything
    plain, _ = lm_loss(peft_lm, x, mask, rows, tgt)
    gated, _ = lm_loss(peft_lm, x, mask, rows, tgt, masks)
    assert not torch.allclose(gated, plain)
    gated.backward()
    grads = [p.grad for n, p in peft_lm.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
