"""AdaToken-3D / FastV gated prefill on a tiny Llama built here: exactness at keep 1.0, pruned-decode consistency
against the dense masked reference and against a plain forward of the pruned sequence, counts and FLOPs."""

from __future__ import annotations

import pytest
import torch

from vision.decoder import PackedDecoder, PackedStep, Segment
from vision.gate3d import GatePolicy, LMShape, gated_prefill, layer_tokens, policy_flops, prefill_flops
from vision.gate3d_flows import combine, dense_forward, fit_decay, fit_policy, prompt_flows

PRE, SPATIAL, POST = 5, 16, 4
T = PRE + SPATIAL + POST
SPANS = [(PRE, PRE + SPATIAL)]


def tiny(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def lm():
    return tiny()


@pytest.fixture(scope="module")
def dec(lm):
    return PackedDecoder(lm)


def embeds(seed: int = 1, n: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g) * 0.5


def test_keep_one_equals_ungated_prefill(dec):
    x = embeds()
    ref_cache = dec.new_cache(2, 64)
    ref = dec(x, PackedStep.build([Segment(1, 0, T)], x.device), ref_cache)[0]
    for policy in (None, GatePolicy(((1, 1.0), (3, 1.0)))):
        cache = dec.new_cache(2, 64)
        g = gated_prefill(dec, cache, 1, x, SPANS, policy)
        assert g.kept == T and g.pos_offset == 0 and g.scored_layers == []
        torch.testing.assert_close(g.logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)


def _decode(dec, cache, g, slot: int, ids: list[int]) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(ids):
        step = PackedStep.build([g.decode_segment(slot, i)], torch.device("cpu"))
        out.append(dec(dec.embed_tokens(torch.tensor([t])), step, cache)[0])
    return out


def _reference_masks(g, n_total: int, n_layers: int) -> list[torch.Tensor]:
    """Per layer: prompt queries see that layer's alive prompt tokens; decode queries see the survivors."""
    masks = []
    final = torch.zeros(n_total, dtype=torch.bool)
    final[g.keep_index] = True
    final[T:] = True
    for li in range(n_layers):
        alive = torch.zeros(n_total, dtype=torch.bool)
        alive[g.layer_alive[li]] = True
        m = torch.zeros(n_total, n_total, dtype=torch.bool)
        m[:T] = alive
        m[T:] = final
        masks.append(m)
    return masks


@pytest.mark.parametrize("policy", [GatePolicy(((1, 0.5), (2, 0.25))), GatePolicy.fastv(2, 0.5),
                                    GatePolicy(((0, 0.75), (3, 0.375)))])
def test_pruned_decode_matches_masked_reference(dec, policy):
    x = embeds()
    cache = dec.new_cache(2, 64)
    g = gated_prefill(dec, cache, 0, x, SPANS, policy)
    n_keep = policy.keep_counts(SPATIAL)[-1][1]
    assert g.kept == PRE + POST + n_keep and g.pos_offset == SPATIAL - n_keep
    assert torch.equal(g.keep_index, g.layer_alive[-1])
    ids = [3, 17, 42]
    got = _decode(dec, cache, g, 0, ids)
    full = torch.cat([x, dec.embed_tokens(torch.tensor(ids))])
    ref, _ = dense_forward(dec, full, visible=_reference_masks(g, T + len(ids), len(dec.layers)))
    torch.testing.assert_close(g.logits, ref[T - 1], rtol=1e-4, atol=1e-4)
    for i, lg in enumerate(got):
        torch.testing.assert_close(lg, ref[T + i], rtol=1e-4, atol=1e-4)


def test_stage_at_layer_zero_equals_forward_of_pruned_sequence(lm, dec):
    """Pruning before the first layer = removing the tokens from the input, positions kept (HF's own forward)."""
    x = embeds(3)
    cache = dec.new_cache(1, 64)
    g = gated_prefill(dec, cache, 0, x, SPANS, GatePolicy(((0, 0.25),)))
    ids = [5, 9]
    got = _decode(dec, cache, g, 0, ids)
    seq = torch.cat([x[g.keep_index], dec.embed_tokens(torch.tensor(ids))]).unsqueeze(0)
    pos = torch.cat([g.keep_index, torch.arange(T, T + len(ids))]).unsqueeze(0)
    with torch.no_grad():
        ref = lm(inputs_embeds=seq, position_ids=pos).logits[0]
    torch.testing.assert_close(g.logits, ref[g.kept - 1], rtol=1e-4, atol=1e-4)
    for i, lg in enumerate(got):
        torch.testing.assert_close(lg, ref[g.kept + i], rtol=1e-4, atol=1e-4)


def test_dense_reference_equals_packed_forward(dec):
    x = embeds(4)
    logits, attns = dense_forward(dec, x, keep_attn=True)
    ref = dec(x, PackedStep.build([Segment(0, 0, T)], x.device), dec.new_cache(1, 64))[0]
    torch.testing.assert_close(logits[-1], ref, rtol=1e-4, atol=1e-4)
    assert len(attns) == len(dec.layers)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(T))


def test_gated_and_plain_requests_decode_together(dec):
    """A gated request (slot 1) and an ungated one (slot 0) of different lengths in one packed decode step."""
    xa, xb = embeds(5, 12), embeds(6)
    cache = dec.new_cache(2, 64)
    dec(xa, PackedStep.build([Segment(0, 0, 12)], xa.device), cache)
    g = gated_prefill(dec, cache, 1, xb, SPANS, GatePolicy.fastv(1, 0.75))
    solo = dec.new_cache(2, 64)
    dec(xa, PackedStep.build([Segment(0, 0, 12)], xa.device), solo)
    gated_prefill(dec, solo, 1, xb, SPANS, GatePolicy.fastv(1, 0.75))
    ref_a = dec(dec.embed_tokens(torch.tensor([7])), PackedStep.build([Segment(0, 12, 1)], xa.device), solo)[0]
    ref_b = dec(dec.embed_tokens(torch.tensor([8])), PackedStep.build([g.decode_segment(1, 0)], xa.device), solo)[0]
    both = dec(dec.embed_tokens(torch.tensor([7, 8])),
               PackedStep.build([Segment(0, 12, 1), g.decode_segment(1, 0)], xa.device), cache)
    torch.testing.assert_close(both[0], ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], ref_b, rtol=1e-5, atol=1e-5)


def test_fastv_keeps_the_right_count(dec):
    g = gated_prefill(dec, dec.new_cache(1, 64), 0, embeds(), SPANS, GatePolicy.fastv(2, 0.5))
    assert g.layer_tokens == [T, T, T - 8, T - 8]
    assert g.scored_layers == [2] and g.kept == T - 8
    spatial_kept = [int(i) for i in g.keep_index if PRE <= i < PRE + SPATIAL]
    assert len(spatial_kept) == 8 and spatial_kept == sorted(spatial_kept)
    assert all(int(i) in g.keep_index.tolist() for i in [*range(PRE), *range(PRE + SPATIAL, T)])  # text never pruned


def test_flops_decrease_and_match_the_run(dec):
    shape = LMShape.of(dec)
    ada = GatePolicy(((1, 0.5), (2, 0.25)))
    fastv = GatePolicy.fastv(2, 0.5)
    full, f_fast, f_ada = (policy_flops(shape, p, T, SPATIAL) for p in (None, fastv, ada))
    assert full > f_fast > f_ada
    for p in (fastv, ada):
        g = gated_prefill(dec, dec.new_cache(1, 64), 0, embeds(), SPANS, p)
        toks, scored = layer_tokens(p, T, SPATIAL, len(dec.layers))
        assert toks == g.layer_tokens and scored == g.scored_layers
    # the count itself, by hand for one layer of 10 tokens
    s = LMShape(d=8, layers=1, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=11)
    per_token = 2 * 8 * (2 * 2 * 4 + 2 * 1 * 4) + 2 * 3 * 8 * 16
    assert prefill_flops(s, [10]) == 10 * per_token + 2 * 2 * 2 * 4 * 55 + 2 * 8 * 11


def test_policy_validation_and_depth_scaling():
    with pytest.raises(ValueError):
        GatePolicy(((3, 0.5), (2, 0.4)))
    with pytest.raises(ValueError):
        GatePolicy(((1, 0.4), (2, 0.6)))
    p = GatePolicy(((8, 0.8), (16, 0.6), (24, 0.4))).for_depth(30, 32)
    assert [li for li, _ in p.stages] == [8, 15, 22]


def test_flows_and_policy_fit(dec):
    x = embeds(7)
    _, attns = dense_forward(dec, x, keep_attn=True)
    fl = combine([prompt_flows(attns, SPANS[0])] * 2)
    assert fl.intra.shape == (len(dec.layers),) and 0 <= fl.share_under_overall <= 1
    assert fl.contribution.max() == pytest.approx(1.0)
    a, b, c = fit_decay(0.2 + 0.8 * torch.exp(-0.3 * torch.arange(30.0)).numpy())
    assert b == pytest.approx(0.3, rel=0.05) and c == pytest.approx(0.2, abs=0.02)
    share_under = 1 - (0.1 + 0.9 * torch.exp(-0.2 * torch.arange(30.0)).numpy())
    pol = fit_policy(share_under, first=2, n_stages=3)
    ratios = [r for _, r in pol.stages]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.3
    assert all(0 < r < 1 for r in ratios)
