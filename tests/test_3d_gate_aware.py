"""Gate-aware training masks (vision/gate_aware.py) replay ``gated_prefill`` exactly on the Hugging Face model: the
same survivors, the same prompt logits, the same logits for the answer rows that decoding computes over the
compacted cache; sequences not drawn for the gate see every token; gradients flow."""

from __future__ import annotations

import pytest
import torch

from tests.test_3d_gate import tiny
from vision.decoder import PackedDecoder, PackedStep
from vision.gate3d import GatePolicy, gated_prefill
from vision.gate_aware import GateBatch, GateMasks, gate_hooks

PRE, SPATIAL = 5, 16


@pytest.fixture(scope="module")
def lm():
    return tiny()


def _batch(posts: list[int], answers: list[int], seed: int = 1):
    """Right-padded (B, T, d) sequences [PRE][SPATIAL][post][answer] and their GateBatch."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(PRE + SPATIAL + p + a, 64, generator=g) * 0.5 for p, a in zip(posts, answers, strict=True)]
    T = max(s.shape[0] for s in seqs)
    x = torch.zeros(len(seqs), T, 64)
    for b, s in enumerate(seqs):
        x[b, :s.shape[0]] = s
    lengths = torch.tensor([s.shape[0] for s in seqs])
    last = torch.tensor([PRE + SPATIAL + p - 1 for p in posts])
    return seqs, x, lengths, last


def _gated_reference(dec, seq: torch.Tensor, T_prompt: int, policy: GatePolicy):
    """Logits of every row from the prompt's last token on: gated prefill, then decode steps over the cache,
    the answer rows fed as embeddings (what the scheduler does with sampled tokens)."""
    cache = dec.new_cache(1, 128)
    g = gated_prefill(dec, cache, 0, seq[:T_prompt], [(PRE, PRE + SPATIAL)], policy)
    out = [g.logits]
    for i in range(seq.shape[0] - T_prompt):
        step = PackedStep.build([g.decode_segment(0, i)], torch.device("cpu"))
        out.append(dec(seq[T_prompt + i:T_prompt + i + 1], step, cache)[0])
    return g, torch.stack(out)


@pytest.mark.parametrize("policy", [GatePolicy(((1, 0.5), (2, 0.25))), GatePolicy(((0, 0.75), (3, 0.375))),
                                    GatePolicy.fastv(2, 0.5)])
def test_masks_replay_gated_prefill_and_decode(lm, policy):
    dec = PackedDecoder(lm)
    posts, answers = [4, 6, 3], [3, 2, 5]
    seqs, x, lengths, last = _batch(posts, answers)
    gb = GateBatch(lengths, (PRE, PRE + SPATIAL), last, torch.tensor([True, True, True]))
    masks = GateMasks(policy, gb, len(lm.model.layers))
    masks.select(lm, x)
    with torch.no_grad(), gate_hooks(lm, masks, x.shape[1], x.dtype):
        logits = lm(inputs_embeds=x).logits
    for b, seq in enumerate(seqs):
        Tp = int(last[b]) + 1
        g, ref = _gated_reference(dec, seq, Tp, policy)
        alive = torch.nonzero(masks.alive[-1][b]).flatten() + PRE
        assert alive.tolist() == [int(i) for i in g.keep_index if PRE <= i < PRE + SPATIAL]
        torch.testing.assert_close(logits[b, Tp - 1:seq.shape[0]], ref, rtol=1e-4, atol=1e-4)


def test_ungated_rows_see_everything_and_gradients_flow(lm):
    policy = GatePolicy(((1, 0.25),))
    seqs, x, lengths, last = _batch([4, 5], [3, 3], seed=2)
    gb = GateBatch(lengths, (PRE, PRE + SPATIAL), last, torch.tensor([False, True]))
    masks = GateMasks(policy, gb, len(lm.model.layers))
    masks.select(lm, x)
    assert bool(masks.alive[-1][0].all()) and int(masks.alive[-1][1].sum()) == 4
    with torch.no_grad():
        plain = lm(inputs_embeds=x[:1, :seqs[0].shape[0]]).logits[0]
    xg = x.clone().requires_grad_(True)
    with gate_hooks(lm, masks, x.shape[1], x.dtype):
        out = lm(inputs_embeds=xg).logits
    torch.testing.assert_close(out[0, :seqs[0].shape[0]], plain, rtol=1e-4, atol=1e-4)
    # the gated sequence's answer rows differ from its ungated forward (tokens were pruned) ...
    with torch.no_grad():
        plain1 = lm(inputs_embeds=x[1:, :seqs[1].shape[0]]).logits[0]
    assert not torch.allclose(out[1, -1], plain1[-1], atol=1e-3)
    # ... and the loss reaches the surviving spatial tokens' inputs, not the pruned ones' past layer 1
    out[1, -1].sum().backward()
    assert xg.grad[1, PRE:PRE + SPATIAL].abs().sum() > 0
