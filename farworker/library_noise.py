"""Library messages that tell a farworker user nothing, silenced at their source: each one by its logger and its
exact text, so every other message of the same library still shows."""

from __future__ import annotations

import logging
import warnings

# transformers logs this advice when a tokenizer's special tokens lie past its base vocabulary. The tiny model's
# byte-level tokenizer has them there by construction (tiny_model.ensure_tiny_tokenizer: ids 259-511 are unused
# special tokens), and farworker only runs inference: nothing is fine-tuned or trained.
ADDED_TOKENS_ADVICE = "Special tokens have been added in the vocabulary"
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_tokenizer_advice() -> None:
    """Drop transformers' added-special-tokens advice (idempotent; call before loading a tokenizer)."""
    logger = logging.getLogger(TOKENIZER_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.prefix == ADDED_TOKENS_ADVICE for f in logger.filters):
        logger.addFilter(_DropMessage(ADDED_TOKENS_ADVICE))


def quiet_pytree_deprecation() -> None:
    """Drop the FutureWarning transformers 4.34 triggers at import under torch 2.13 (it calls a pytree function torch
    renamed; harmless): call before importing transformers. petals' import has its own (petals/compat.py)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers.utils.generic",
                            message=r"`torch\.utils\._pytree\._register_pytree_node` is deprecated")
