"""Causal language models: loading (``lm.loading``) and the spoken-dialogue chat wrapper (``lm.chat``)."""
