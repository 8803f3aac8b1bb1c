"""Training recipes (vision/train.py) on a tiny Llama and tokenizer built here: the loss is on the answer
tokens only, the cached prefix changes nothing, batches are a function of the step, and steps learn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.vision_fixtures import tiny_llama, tiny_tokenizer
from vision.data import Example
from vision.mma import IMAGE, TEXT, MMAConfig, apply_mma, attach_visual
from vision.model import IMAGE_PLACEHOLDER
from vision.train import (
    Batcher,
    Prefix,
    Sampler,
    TrainConfig,
    answer_loss,
    batch_loss,
    common_prefix,
    encode,
    exact_match,
    fit_router,
    lr_at,
)

FEAT = 16  # feature width of the toy image features (EfficientNet's is 1280)


def _setup(n_images: int = 6, seed: int = 0):
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok), seed)
    lm.requires_grad_(False)
    colours = ["red", "blue", "green"]
    examples, rows = [], {}
    for i in range(n_images):
        rows[f"images/{i}.png"] = i
        examples.append(Example(f"i{i}", "train", "colour", "image", "what colour is the square?", colours[i % 3],
                                f"images/{i}.png"))
    examples += [Example("t0", "train", "word", "text", "one two three", "four"),
                 Example("t1", "train", "word", "text", "red green", "blue")]
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, 4, FEAT, generator=gen).to(torch.float16)  # (N, tokens, feat)
    for i in range(n_images):  # a colour-dependent signal the projector can learn to read
        features[i, :, i % 3] += 3.0
    torch.manual_seed(seed)
    projector = nn.Sequential(nn.Linear(FEAT, 64), nn.GELU(), nn.Linear(64, 64))
    enc = encode(examples, tok, rows)
    return tok, lm, projector, features, enc


def test_encoding_matches_the_serving_prompt_and_targets_end_the_turn():
    tok, lm, projector, features, enc = _setup()
    im, tx = enc[0], enc[-1]
    assert im.modality == IMAGE and len(im.pieces) == 2 and im.feature_row == 0
    assert tx.modality == TEXT and len(tx.pieces) == 1 and tx.feature_row == -1
    text = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nwhat colour is the square?"}],
                                   tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_PLACEHOLDER)
    assert tok.decode(im.pieces[0]) == before and tok.decode(im.pieces[1]) == after
    assert tok.decode(im.target) == "red<|im_end|>"


def test_loss_is_on_answer_tokens_only():
    tok, lm, projector, features, enc = _setup()
    batcher = Batcher(lm.model.embed_tokens, projector, features, torch.float32)
    items = enc[:2] + enc[-1:]
    x, mask, rows, cols, targets = batcher(items)
    assert x.shape[0] == 3 and mask.shape == x.shape[:2]
    assert len(targets) == sum(len(it.target) for it in items)
    # the row before each target holds the previous token: the target itself sits at col + 1
    emb = lm.model.embed_tokens(targets)
    torch.testing.assert_close(x[rows, cols + 1], emb)
    # changing the prompt's tokens after the last answer row cannot change the loss; padding is masked
    loss, hits, r = answer_loss(lm, items, batcher, None)
    assert loss.ndim == 0 and hits.shape == targets.shape
    assert exact_match(torch.tensor([True, True, False, True]), torch.tensor([0, 0, 1, 1]), 2).tolist() == [True, False]


def test_loss_grouped_by_modality_equals_the_padded_batch():
    tok, lm, projector, features, enc = _setup()
    batcher = Batcher(lm.model.embed_tokens, projector, features, torch.float32)
    items = enc[:3] + enc[-2:]
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(lm, items, batcher, None), answer_loss(lm, items, batcher, None)[0],
                                   atol=1e-5, rtol=1e-5)


def test_cached_prefix_gives_the_same_loss():
    tok, lm, projector, features, enc = _setup()
    items = enc[:4]
    prefix = Prefix.compute(lm, common_prefix(items), torch.float32)
    assert len(prefix.ids) > 3
    plain = answer_loss(lm, items, Batcher(lm.model.embed_tokens, projector, features, torch.float32), None)[0]
    cached = answer_loss(lm, items, Batcher(lm.model.embed_tokens, projector, features, torch.float32, prefix), None)[0]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)


def test_projector_steps_reduce_the_loss():
    tok, lm, projector, features, enc = _setup()
    items = [e for e in enc if e.modality == IMAGE]
    batcher = Batcher(lm.model.embed_tokens, projector, features, torch.float32)
    opt = torch.optim.AdamW(projector.parameters(), lr=3e-2)
    before = answer_loss(lm, items, batcher, None)[0].item()
    for _ in range(25):
        loss = answer_loss(lm, items, batcher, None)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = answer_loss(lm, items, batcher, None)[0].item()
    assert after < before - 0.1  # a random tiny LM moves little, but it moves
    assert all(p.grad is None for p in lm.parameters())  # the LM stays frozen


@pytest.mark.parametrize("paths", [2, 1])
def test_mma_steps_reduce_the_loss_and_train_only_the_adapters(paths):
    tok, lm, projector, features, enc = _setup()
    projector.requires_grad_(False)
    frozen = copy.deepcopy(lm.state_dict())
    mma = apply_mma(lm.model.layers, MMAConfig(paths=paths, dropout=0.0))
    mma.train()
    batcher = Batcher(lm.model.embed_tokens, projector, features, torch.float32)
    opt = torch.optim.AdamW(mma.parameters(), lr=1e-2)
    before = answer_loss(lm, enc, batcher, mma)[0].item()
    for _ in range(15):
        loss = answer_loss(lm, enc, batcher, mma)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = answer_loss(lm, enc, batcher, mma)[0].item()
    assert after < before - 0.3
    if paths == 2:  # the modality embeddings and the routers learned
        assert mma.modality.grad is not None and mma.adapters[0].router.weight.grad is not None
    for k, v in lm.state_dict().items():  # the LM's own weights are unchanged
        if ".adapter." not in k:
            torch.testing.assert_close(v, frozen[k.replace("input_layernorm.norm.", "input_layernorm.")])


def test_mma_with_routing_loss_and_visual_adapter_learns_and_routes_each_modality_to_its_path():
    """Stage 2 as run() trains it: answer loss + the auxiliary routing loss, the visual adapter on the image
    features before the frozen projector. The loss falls, the visual adapter learns, the projector and the
    LM stay as they were, and every layer routes text to path 0 and images to path 1."""
    tok, lm, projector, features, enc = _setup()
    projector.requires_grad_(False)
    frozen_projector = copy.deepcopy(projector.state_dict())
    mma = apply_mma(lm.model.layers, MMAConfig(dropout=0.0, visual_rank=8, feature_dim=FEAT))
    attach_visual(mma, projector)
    mma.train()
    batcher = Batcher(lm.model.embed_tokens, projector, features, torch.float32)
    opt = torch.optim.AdamW(mma.parameters(), lr=1e-2)
    cfg = TrainConfig(stage="mma")
    before = batch_loss(lm, enc, batcher, mma).item()
    for _ in range(15):
        loss = batch_loss(lm, enc, batcher, mma) + cfg.route_loss * mma.routing_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = batch_loss(lm, enc, batcher, mma).item()
    assert after < before - 0.3
    assert mma.visual.up.weight.abs().max() > 0  # it moved from its zero init
    for k, v in projector.state_dict().items():
        torch.testing.assert_close(v, frozen_projector[k])
    mma.eval()
    mma.refresh()
    table = mma.table()
    assert (table[:, TEXT].argmax(-1) == 0).all() and (table[:, IMAGE].argmax(-1) == 1).all()


def test_fit_router_settles_the_routing_before_the_adapters_learn():
    lm = tiny_llama(100)
    lm.requires_grad_(False)
    mma = apply_mma(lm.model.layers, MMAConfig(visual_rank=4, feature_dim=FEAT))
    before = {k: v.clone() for k, v in mma.state_dict().items()}
    own = fit_router(mma)
    assert own > 0.97
    for k, v in mma.state_dict().items():  # only the routers moved
        if ".router." not in k:
            torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in mma.parameters())


def test_batches_are_a_function_of_the_step_and_mix_modalities():
    tok, lm, projector, features, enc = _setup()
    images = [e for e in enc if e.modality == IMAGE]
    texts = [e for e in enc if e.modality == TEXT]
    cfg = TrainConfig(stage="mma", batch=4, text_fraction=0.25)
    a, b = Sampler(images, texts, cfg), Sampler(images, texts, cfg)
    assert [id(x) for x in a.batch(7)] == [id(x) for x in b.batch(7)]
    assert [x.modality for x in a.batch(0)] == [IMAGE, IMAGE, IMAGE, TEXT]
    seen = {id(x) for s in range(3) for x in a.batch(s)[:3]}
    assert len(seen) == len(images)  # an epoch visits every image example before repeating
    assert all(x.modality == IMAGE for x in Sampler(images, texts, TrainConfig(stage="projector", batch=4)).batch(0))


def test_schedule_and_config():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    timed = TrainConfig(steps=100, warmup=10, lr=1.0, minutes=1.0)
    assert lr_at(20, timed, seconds=60.0) == pytest.approx(0.1)  # out of time: the end of the schedule
    with pytest.raises(ValueError):
        TrainConfig(stage="nope")
    with pytest.raises(ValueError):
        TrainConfig(text_fraction=1.0)
    with pytest.raises(ValueError):
        TrainConfig(route_loss=-1.0)
