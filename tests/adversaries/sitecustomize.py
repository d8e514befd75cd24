"""A dishonest worker, made from outside the package: put this folder first on a `farworker run` process's
PYTHONPATH and set FARWORKER_ADVERSARY; Python imports this module at start-up (sitecustomize), before petals or
farworker are imported, and patches them as they load. The server's handler and runtime processes are forked
from the patched process, so they inherit the patches.

- ``decode-skip``: every one-position inference step returns its input hidden states unchanged (nothing is
  computed); longer steps (the prefill) are computed honestly.
- ``decode-noise``: one-position steps are computed, then 1 % relative noise is added to each output position
  (noise of norm 0.01 x the position's hidden-state norm).
- ``framer``: every step is computed and answered honestly to the client, but first the step's outputs, altered
  (negated), are pushed to the next server (petals' rpc_push, with handler._push_outputs) under the session id the
  client disclosed in the step's ``next_servers``; that server computes on whichever copy of a step arrives first,
  here always the push. (petals 2.2.0.post1's own push never fires: rpc_inference pushes with the session's
  first request's metadata, which never carries ``next_servers``; a framer pushes by itself.)

Decode steps reach the runtime through farworker's step-batching pool (farworker/petals/step_batching.py): its
StepBatcher is the pool's process function for every inference step, batched (a CoBatch of several sessions'
steps) or alone (petals' merged step), so the compute patches wrap StepBatcher.__call__. Any other kind set in
the variable stops the process at start-up: a mistyped adversary must not pass for an honest worker.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

KIND = os.environ.get("FARWORKER_ADVERSARY", "")
KINDS = ("decode-skip", "decode-noise", "framer")
NOISE = 0.01  # decode-noise: relative to each output position's norm


def _step_inputs(args) -> list:
    """The hidden states of each step a StepBatcher call runs (one for petals' merged step, several batched)."""
    from farworker.petals.step_batching import CoBatch

    if args and isinstance(args[0], CoBatch):
        return [step[0] for step in args[0].steps]
    return [args[0]]


def _patch_step_batching(module) -> None:
    import torch

    honest_call = module.StepBatcher.__call__

    def call(self, *args):
        inputs = _step_inputs(args)
        one_position = all(hidden.ndim == 3 and hidden.shape[1] == 1 for hidden in inputs)
        if KIND == "decode-skip" and one_position:
            return (torch.cat([hidden.float() for hidden in inputs], dim=0),)
        outputs = honest_call(self, *args)
        if KIND == "decode-noise" and one_position:
            (hidden,) = outputs
            noise = torch.randn_like(hidden)
            noise = noise / noise.norm(dim=-1, keepdim=True) * hidden.norm(dim=-1, keepdim=True) * NOISE
            return (hidden + noise,)
        return outputs

    module.StepBatcher.__call__ = call


def _patch_handler(module) -> None:
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.utils.serializer import MSGPackSerializer

    honest_inference = module.TransformerConnectionHandler.rpc_inference

    @functools.wraps(honest_inference)  # hivemind registers rpc_* methods by their annotations
    async def rpc_inference(self, requests, context):
        latest = {}  # the step request the handler read last: the one the next reply answers

        async def watched():
            async for request in requests:
                latest["request"] = request
                yield request

        async for reply in honest_inference(self, watched(), context):
            request = latest.get("request")
            metadata = MSGPackSerializer.loads(request.metadata) if request is not None and request.metadata else {}
            if metadata.get("next_servers") and reply.tensors:
                # pushed (and received) before the client gets its honest reply: the neighbour computes on it
                altered = -deserialize_torch_tensor(reply.tensors[0])
                await self._push_outputs(request, serialize_torch_tensor(altered, reply.tensors[0].compression),
                                         metadata)
            yield reply

    module.TransformerConnectionHandler.rpc_inference = rpc_inference


PATCHES = {"decode-skip": {"farworker.petals.step_batching": _patch_step_batching},
           "decode-noise": {"farworker.petals.step_batching": _patch_step_batching},
           "framer": {"petals.server.handler": _patch_handler}}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch on a module right after it is executed, whoever imports it first."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)  # find the real spec without coming back here
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        patch, exec_module = self.patches[name], spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)
            print(f"adversary {KIND}: patched {name}", file=sys.stderr, flush=True)

        spec.loader.exec_module = exec_and_patch
        return spec


if KIND:
    if KIND not in KINDS:
        raise SystemExit(f"FARWORKER_ADVERSARY: unknown kind {KIND!r} (one of {', '.join(KINDS)})")
    sys.meta_path.insert(0, _PatchAfterImport(PATCHES[KIND]))
