"""The logits of every prompt position, from the client's first forward of a generation: transformers' generate
keeps only the last position's, and ``echo`` needs the prompt's own log-probabilities. Nothing is run twice: the
petals client's LM head already computes them all in that forward.

One forward hook on the client's LM head, installed once; each generation thread asks for its own capture (a
thread-local), so concurrent generations never see each other's logits.
"""

from __future__ import annotations

import contextlib
import threading

_local = threading.local()


def install(model) -> None:
    """Hook ``model``'s LM head (the petals client computes it locally) once."""
    if not getattr(model, "_farworker_prompt_logits", False):
        model.lm_head.register_forward_hook(_keep_first)
        model._farworker_prompt_logits = True


def _keep_first(_module, _args, output) -> None:
    target = getattr(_local, "target", None)
    if target is not None and not target:  # the first forward: the whole prompt
        target.append(output.detach())


@contextlib.contextmanager
def first_forward_logits():
    """Inside: the first LM-head output of this thread ([batch, positions, vocab]) lands in the yielded list."""
    target: list = []
    _local.target = target
    try:
        yield target
    finally:
        _local.target = None
