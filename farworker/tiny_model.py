"""The embedded default model: a tiny Llama checkpoint made deterministically on first use.

No hub download: the weights come from a fixed seed, so every machine builds the same bytes and a
private mesh (demo, tests, container checks) can compare mesh output with local transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from farworker.catalog import TINY_MODEL_NAME

# torch, transformers and tokenizers are imported only to build the checkpoint once: the worker, `check` and the
# tests import this module for the model's name, shape and path.
TINY_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}
_SEED = 20261126
_MARKER = "farworker-tiny.json"


def default_cache_root() -> Path:
    return Path(os.environ.get("FARWORKER_CACHE_ROOT", Path.home() / ".cache" / "farworker"))


# Llama-2 chat's own template (its tokenizer_config.json on the hub): [INST] ... [/INST] turns, <<SYS>> system.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def ensure_tiny_checkpoint(root: Path | None = None) -> Path:
    """Return the directory of the tiny checkpoint, building it once (atomically) if missing."""
    directory = (root or default_cache_root()) / TINY_MODEL_NAME
    if (directory / _MARKER).is_file():
        ensure_tiny_tokenizer(directory)  # checkpoints built before it had one
        return directory
    import torch

    from farworker.library_noise import quiet_pytree_deprecation

    quiet_pytree_deprecation()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(_SEED)
    config = LlamaConfig(**TINY_CONFIG, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    ensure_tiny_tokenizer(tmp)
    (tmp / _MARKER).write_text(json.dumps({"seed": _SEED, **TINY_CONFIG}))
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(directory)
    except OSError:  # another process built it first; theirs is byte-identical
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def ensure_tiny_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer for the tiny model, so text, chat and streaming run end to end offline.

    Every UTF-8 text maps to byte tokens (ids 3-258: no merges, so any machine builds the same one); <unk>,
    <s>, </s> are 0-2 and the rest of the model's 512 ids are unused special tokens. The chat template is
    Llama-2 chat's. tokenizer.json is written last: its presence means the tokenizer is complete.
    """
    if (directory / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    unused = [f"<unused_{i}>" for i in range(TINY_CONFIG["vocab_size"] - len(vocab))]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=unused)
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        fast.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == "tokenizer.json")
        for name in names:
            shutil.move(os.path.join(tmp, name), directory / name)
