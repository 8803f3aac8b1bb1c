"""Tiny, real vision-serving components built inside the tests (nothing is downloaded).

A byte-level BPE tokenizer with a ChatML template, a 2-layer Llama, a toy image encoder, and peft LoRA
adapters of different ranks and target modules with non-zero weights, saved in peft's format.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ADAPTERS = {  # name: (rank, alpha, target modules)
    "ad-a": (4, 8, ["q_proj", "v_proj"]),
    "ad-b": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "ad-c": (2, 2, ["o_proj", "down_proj"]),
}


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = ["what colour is the square? the square is red.", "how many circles are there? there are two.",
              "you are a helpful assistant. answer in one word.", "red green blue yellow one two three four"] * 20
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class ToyImageEncoder(nn.Module):
    """4 tokens per image from 2x2 average-pooled pixels: enough to make images change the answer."""

    tokens_per_image = 4

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(3, dim)

    def __call__(self, images):
        import numpy as np

        xs = []
        for im in images:
            a = torch.from_numpy(np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32) / 255.0)
            xs.append(self.proj(a.reshape(4, 3)))
        return torch.stack(xs)


def save_adapters(base: nn.Module, folder: Path) -> dict[str, Path]:
    """Each adapter of ``ADAPTERS`` with random (non-zero) A and B, saved by peft; returns name → folder."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                               init_lora_weights=False, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.2)
        model.save_pretrained(folder / name)
        paths[name] = folder / name
    return paths


def peft_reference(base: nn.Module, paths: dict[str, Path]):
    """One peft model holding every adapter (names as given), for mixed-batch references."""
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(paths[n]), adapter_name=n)
    return model.eval()
