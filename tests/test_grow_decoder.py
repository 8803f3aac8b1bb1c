"""Growing a codec decoder keeps its sound exactly and leaves no new weight without a gradient."""

import pytest
import torch

from speech.codec import SpeechCodec
from speech.config import CodecConfig
from speech.grow import grow_decoder

SMALL = CodecConfig(channels=32, latent_dim=16, codebook_size=32, enc_blocks=1, frame_blocks=1, dec_blocks=2)


def trained_like(cfg: CodecConfig) -> SpeechCodec:
    """A codec whose every weight is non-zero (a fresh one has zero biases, which would hide mistakes)."""
    torch.manual_seed(0)
    codec = SpeechCodec(cfg)
    with torch.no_grad():
        for p in codec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return codec


@pytest.mark.parametrize("channels,blocks", [(48, 0), (0, 4), (64, 3)])
def test_a_grown_decoder_sounds_exactly_like_its_source(channels, blocks):
    src = trained_like(SMALL)
    grown = grow_decoder(src, channels, blocks)
    assert grown.dec_head.in_channels == (channels or 32)
    assert len(grown.dec_blocks) == (blocks or 2)
    codes = torch.randint(0, 32, (2, 12))
    wav = torch.randn(1, 640 * 6) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(grown.decode(codes), src.decode(codes), rtol=0, atol=1e-6)
        assert torch.equal(grown.encode(wav), src.encode(wav))  # the tokens do not change
    # streaming equals offline for the grown decoder too
    state = grown.init_state(2)
    with torch.no_grad():
        steps = torch.cat([grown.decode_step(codes[:, t], state) for t in range(codes.shape[1])], dim=1)
    torch.testing.assert_close(steps, src.decode(codes), rtol=1e-4, atol=1e-5)


def test_every_new_weight_learns():
    """Zero writes with random reads: the gradient reaches every weight that starts at zero, so none
    of the new room stays dead (a weight between two new channels gets it after the first step)."""
    src = trained_like(SMALL)
    grown = grow_decoder(src, 48, 3)
    zero_at_start = {n: p == 0 for n, p in grown.named_parameters() if n.startswith("dec_") and (p == 0).any()}
    assert {"dec_in.weight", "dec_up.weight", "dec_blocks.2.mix.weight"} <= set(zero_at_start)
    codes = torch.randint(0, 32, (2, 10))
    opt = torch.optim.SGD(grown.decoder_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        grown.decode(codes).pow(2).mean().backward()
        opt.step()
    for name, mask in zero_at_start.items():
        g = grown.get_parameter(name).grad[mask]
        assert (g != 0).float().mean() > 0.95, name


def test_shrinking_is_refused():
    src = trained_like(SMALL)
    with pytest.raises(ValueError, match="can only grow"):
        grow_decoder(src, 16, 0)
    with pytest.raises(ValueError, match="can only grow"):
        grow_decoder(src, 0, 1)
