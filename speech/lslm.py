"""The Listening-while-Speaking LM (LSLM, arXiv 2408.02622): a decoder-only TTS that also listens.

Sequence: text tokens (the prefix to speak), then speech positions. At speech position t the input is
the previous codec token (BOS first) and the listening vector S_p,t = Proj(Enc(x_t)) of frame t joins:

* early  — added to the input embedding only;
* middle — added (with the position embedding p_t) to the input of every block (the paper's choice);
* late   — projected to the vocabulary and added to the logits;
* none   — a plain TTS that ignores the listening channel.

The output vocabulary is the codebook plus EOS and IRQ; IRQ means "the user barged in: stop now".

``forward`` is the training path (teacher forcing over whole sequences); ``prefill`` and
``decode_step`` are the serving path over a preallocated KV cache indexed by slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.config import LSLMConfig


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention + GELU MLP."""

    def __init__(self, cfg: LSLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(self.n_heads * self.head_dim, dim=-1)
        # (B, nh, T, hs)
        return tuple(y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))

    def _finish(self, x: Tensor, att: Tensor) -> Tensor:
        b, _, t, _ = att.shape
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(b, t, -1)))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(x)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def forward_cached(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor, mask: Tensor
    ) -> Tensor:
        """Decode one position per row. ``x`` (B, 1, D); caches (B, nh, T, hs) views; ``pos`` (B,)."""
        q, k, v = self._split(x)
        k_cache[rows, :, pos] = k[:, :, 0]
        v_cache[rows, :, pos] = v[:, :, 0]
        t = mask.shape[-1]
        att = F.scaled_dot_product_attention(q, k_cache[:, :, :t], v_cache[:, :, :t], attn_mask=mask)
        return self._finish(x, att)

    def prefill_cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Run a prefix for one slot. ``x`` (1, L, D); caches (nh, T, hs) of that slot."""
        q, k, v = self._split(x)
        length = x.shape[1]
        k_cache[:, :length] = k[0]
        v_cache[:, :length] = v[0]
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class LSLM(nn.Module):
    def __init__(self, cfg: LSLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.text_vocab, cfg.d_model)
        self.speech_emb = nn.Embedding(cfg.codebook_size + 1, cfg.d_model)  # codes + speech BOS
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.listen_norm = nn.LayerNorm(cfg.listen_dim) if cfg.listen_norm else nn.Identity()
        self.listen_proj = nn.Linear(cfg.listen_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.out_vocab)
        self.late_proj = nn.Linear(cfg.d_model, cfg.out_vocab) if cfg.fusion == "late" else None
        self.apply(self._init)
        if cfg.listen_norm:  # the speaking channel starts as a plain TTS; listening is learned on top
            nn.init.zeros_(self.listen_proj.weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---------------------------------------------------------------- fusion, shared by both paths
    def _run_blocks(self, x: Tensor, pos_e: Tensor, listen: Tensor, block_fn) -> Tensor:
        """``x`` (B, T, D) embeddings; ``listen`` (B, T, D) projected listening vectors (0 on text)."""
        fusion = self.cfg.fusion
        if fusion == "early":
            x = x + listen
        x = x + pos_e
        for i, block in enumerate(self.blocks):
            if fusion == "middle" and i > 0:
                x = x + pos_e + listen
            elif fusion == "middle":
                x = x + listen
            x = block_fn(i, block, x)
        logits = self.head(self.ln_out(x))
        if self.late_proj is not None:
            logits = logits + self.late_proj(listen)
        return logits

    # ---------------------------------------------------------------- training path
    def forward_packed(self, ids: Tensor, is_speech: Tensor, listen_feats: Tensor | None) -> Tensor:
        """Teacher forcing over packed sequences: each row is [text ids..., speech ids...], right-padded.

        ids (B, T): text ids at text positions, speech ids (BOS then codes) at speech positions;
        is_speech (B, T) bool; listen_feats (B, T, listen_dim), zero at text positions.
        Returns logits (B, T, out_vocab); only speech positions are meaningful.
        """
        t = ids.shape[1]
        text_ids = torch.where(is_speech, 0, ids).clamp(max=self.cfg.text_vocab - 1)
        speech_ids = torch.where(is_speech, ids, 0).clamp(max=self.cfg.codebook_size)
        x = torch.where(is_speech[..., None], self.speech_emb(speech_ids), self.text_emb(text_ids))
        pos_e = self.pos_emb(torch.arange(t, device=ids.device))[None]
        if listen_feats is None or self.cfg.fusion == "none":
            listen = torch.zeros_like(x)
        else:
            listen = self.listen_proj(self.listen_norm(listen_feats)) * is_speech[..., None]
        return self._run_blocks(x, pos_e, listen, lambda i, blk, h: blk(h))

    def forward(self, text: Tensor, speech_in: Tensor, listen_feats: Tensor | None = None) -> Tensor:
        """Teacher forcing for rows of equal text length: text (B, L), speech_in (B, S) (BOS then codes),
        listen_feats (B, S, listen_dim). Returns logits (B, S, out_vocab) of the speech positions."""
        b, length = text.shape
        ids = torch.cat([text, speech_in], dim=1)
        is_speech = torch.zeros_like(ids, dtype=torch.bool)
        is_speech[:, length:] = True
        feats = None
        if listen_feats is not None:
            feats = torch.cat([listen_feats.new_zeros(b, length, listen_feats.shape[-1]), listen_feats], dim=1)
        return self.forward_packed(ids, is_speech, feats)[:, length:]

    # ---------------------------------------------------------------- serving path
    def init_cache(self, slots: int, device, dtype) -> tuple[Tensor, Tensor]:
        """KV cache (layers, slots, nh, T, hs) for keys and values."""
        cfg = self.cfg
        shape = (cfg.n_layers, slots, cfg.n_heads, cfg.max_seq_len, cfg.d_model // cfg.n_heads)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def prefill(self, text: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
        """Write the text prefix of one slot into its cache. text (L,); caches (layers, nh, T, hs)."""
        length = text.shape[0]
        x = self.text_emb(text)[None]
        pos_e = self.pos_emb(torch.arange(length, device=text.device))[None]
        listen = torch.zeros_like(x)
        self._run_blocks(x, pos_e, listen, lambda i, blk, h: blk.prefill_cached(h, k_cache[i], v_cache[i]))

    def decode_step(
        self, tokens: Tensor, pos: Tensor, listen_feats: Tensor, k_cache: Tensor, v_cache: Tensor, t_max: int
    ) -> Tensor:
        """One speech position for B slots.

        tokens (B,) previous speech ids; pos (B,) their positions; listen_feats (B, listen_dim);
        caches (layers, B, nh, T, hs) views of the slots' rows; t_max > every pos.
        Returns logits (B, out_vocab).
        """
        b = tokens.shape[0]
        rows = torch.arange(b, device=tokens.device)
        x = self.speech_emb(tokens)[:, None]
        pos_e = self.pos_emb(pos)[:, None]
        listen = self.listen_proj(self.listen_norm(listen_feats))[:, None] if self.cfg.fusion != "none" else torch.zeros_like(x)
        mask = (torch.arange(t_max, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        logits = self._run_blocks(
            x, pos_e, listen, lambda i, blk, h: blk.forward_cached(h, k_cache[i], v_cache[i], rows, pos, mask)
        )
        return logits[:, 0]
