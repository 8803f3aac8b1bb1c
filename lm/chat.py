"""The dialogue brain's text side: a causal LM that answers a conversation in short, speakable text, streamed.

``ChatLM.stream(messages)`` yields the answer piece by piece while it is generated: a greedy loop over a
KV cache (``prefill`` once, then ``decode_one_token`` per token), so the first words reach the speaking
channel before the answer is finished. Output is cleaned for speech (no markdown, lists, emojis or
URLs) and cut after ``max_sentences`` sentences: a voice answer is one or two sentences, and every
extra token costs time before the user hears the end of it.

Greedy decoding makes the answer a pure function of the conversation (tests and evaluation rely on it).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.loading import DEFAULT_LM, load_causal_lm, stop_token_ids

VOICE_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Your answers are spoken aloud, so reply in one or two short, "
    "simple sentences of plain text. Never use lists, markdown, code, emojis or links."
)


@dataclass
class ChatConfig:
    system_prompt: str = VOICE_SYSTEM_PROMPT
    max_new_tokens: int = 64  # ~ 3 s of speech; bounds the time to the end of an answer
    max_sentences: int = 2
    max_prompt_tokens: int = 1024  # older turns are dropped to fit (the system prompt is kept)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.max_sentences < 1:
            raise ValueError("max_sentences must be at least 1")
        if self.max_prompt_tokens < 16:
            raise ValueError("max_prompt_tokens must be at least 16")


class ChatLM:
    """A chat-template causal LM (any ``transformers`` causal LM with a chat template) answering for a voice."""

    def __init__(self, model, tokenizer, cfg: ChatConfig | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: the chat model must be an instruction-tuned LM")
        self.model, self.tokenizer = model, tokenizer
        self.cfg = cfg or ChatConfig()
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(
        cls, name_or_path: str | Path = DEFAULT_LM, device: str = "cpu", dtype: torch.dtype | None = None,
        cfg: ChatConfig | None = None,
    ) -> ChatLM:
        model, tokenizer = load_causal_lm(name_or_path, device, dtype)
        chat = cls(model, tokenizer, cfg)
        chat.name = str(name_or_path)
        return chat

    # ---------------------------------------------------------------- prompt
    def prompt_ids(self, messages: list[dict[str, str]], instructions: str = "") -> torch.Tensor:
        """``[{"role", "content"}, ...]`` → (1, T) prompt ids, the system prompt first, old turns dropped to fit."""
        system = self.cfg.system_prompt + (f" {instructions.strip()}" if instructions.strip() else "")
        turns = [m for m in messages if m["role"] in ("user", "assistant") and m["content"].strip()]
        while True:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *turns], add_generation_prompt=True, tokenize=True,
                return_dict=False,
            )
            if len(ids) <= self.cfg.max_prompt_tokens or len(turns) <= 1:
                break
            turns = turns[1:]
        ids = ids[-self.cfg.max_prompt_tokens :]
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    # ---------------------------------------------------------------- the decode loop
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor):
        """(1, T) prompt → (logits of the last position (V,), the KV cache)."""
        out = self.model(input_ids=input_ids, use_cache=True)
        return out.logits[0, -1], out.past_key_values

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, cache):
        """(1, 1) token → (logits (V,), the KV cache grown by one position)."""
        out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
        return out.logits[0, -1], out.past_key_values

    def generate_ids(self, input_ids: torch.Tensor, stop: threading.Event | None = None) -> Iterator[int]:
        """Greedy token ids, up to ``max_new_tokens``, ending before an end-of-turn token or when ``stop`` is set."""
        logits, cache = self.prefill(input_ids)
        for i in range(self.cfg.max_new_tokens):
            token = logits.argmax()
            tid = int(token)  # one host sync per token: the text must leave as it comes
            if tid in self.stop_ids or (stop is not None and stop.is_set()):
                return
            yield tid
            if i + 1 < self.cfg.max_new_tokens:
                logits, cache = self.decode_one_token(token.view(1, 1), cache)

    # ---------------------------------------------------------------- text out
    def stream(
        self, messages: list[dict[str, str]], instructions: str = "", stop: threading.Event | None = None
    ) -> Iterator[str]:
        """The answer as speakable text pieces (whole words), while it is generated."""
        ids: list[int] = []
        cleaner = SpeechText(self.cfg.max_sentences)
        for tid in self.generate_ids(self.prompt_ids(messages, instructions), stop):
            ids.append(tid)
            raw = self.tokenizer.decode(ids, skip_special_tokens=True)
            if raw.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                continue
            piece = cleaner.feed(raw)
            if piece:
                yield piece
            if cleaner.finished:
                return
        piece = cleaner.finish(self.tokenizer.decode(ids, skip_special_tokens=True))
        if piece:
            yield piece

    def reply(self, messages: list[dict[str, str]], instructions: str = "") -> str:
        return "".join(self.stream(messages, instructions))


# ------------------------------------------------------------------ cleaning for speech
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_URL = re.compile(r"(https?://|www\.)\S+")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")  # markdown [text](url) -> text
_LIST_MARK = re.compile(r"(?m)^\s*(?:[-*+•]|\d+[.)])\s+")
_MARKUP = re.compile(r"[*_#`~|<>\[\]{}\\^]")


def clean_for_speech(text: str) -> str:
    """Markdown, list marks, emojis, URLs and line breaks out; the words and their punctuation kept."""
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = _MARKUP.sub("", text)
    text = text.replace("&", " and ")
    text = "".join(
        ch for ch in text
        if ch in "\n\t" or unicodedata.category(ch)[0] not in "SC" or ch in "$%+=@"
    )
    return " ".join(text.split())


class SpeechText:
    """Streaming cleaner: raw decoded text so far → the new speakable text, whole words only.

    Only the part of the raw text up to its last whitespace is cleaned (a word still being written could
    yet turn out to be markup or a URL); ``finish`` cleans the rest. ``finished`` turns true after
    ``max_sentences`` complete sentences, and the text is cut there.
    """

    def __init__(self, max_sentences: int) -> None:
        self.max_sentences = max_sentences
        self.emitted = ""
        self.finished = False

    def feed(self, raw: str) -> str:
        cut = max(raw.rfind(" "), raw.rfind("\n"), raw.rfind("\t"))
        if cut <= 0:
            return ""
        return self._advance(clean_for_speech(raw[:cut]) + " ", final=False)

    def finish(self, raw: str) -> str:
        return "" if self.finished else self._advance(clean_for_speech(raw) + " ", final=True)

    def _advance(self, cleaned: str, final: bool) -> str:
        ends = [m.end() for m in _SENTENCE_END.finditer(cleaned)]
        if len(ends) >= self.max_sentences:
            cleaned, self.finished = cleaned[: ends[self.max_sentences - 1]], True
        else:
            cleaned = cleaned.rstrip()  # the space after the last word goes out with the next word
        if not cleaned.startswith(self.emitted):  # cleaning a longer text changed its start: rare; say no more
            return ""
        new, self.emitted = cleaned[len(self.emitted) :], cleaned
        return new
