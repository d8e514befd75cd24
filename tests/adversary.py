"""Start a dishonest `farworker run`: its environment puts tests/adversaries/ first on PYTHONPATH (its
sitecustomize.py patches petals' serving path at start-up) and names the kind of cheat."""

from __future__ import annotations

import os
from pathlib import Path

ADVERSARIES = Path(__file__).resolve().parent / "adversaries"


def adversary_env(kind: str) -> dict[str, str]:
    """Extra environment for start_worker: the worker's own PYTHONPATH keeps working after the adversary's."""
    path = os.pathsep.join(p for p in (str(ADVERSARIES), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FARWORKER_ADVERSARY": kind}


def mesh_hidden_states(client, tokens: list[int], prompt_length: int):
    """The mesh's last hidden states [1, len(tokens), hidden] for a session that sends the first
    ``prompt_length`` tokens as its prefill and then one token per step (teacher-forced, so every
    adversary sees the same decode steps)."""
    import torch

    client.warm()
    model = client._model
    embed = model.get_input_embeddings()
    outputs = []
    with torch.inference_mode(), model.inference_session(max_length=len(tokens)) as session:
        outputs.append(session.step(embed(torch.tensor([tokens[:prompt_length]]))))
        for token in tokens[prompt_length:]:
            outputs.append(session.step(embed(torch.tensor([[token]]))))
    return torch.cat(outputs, dim=1)


def local_hidden_states(model_path, tokens: list[int]):
    """Local transformers' output of the last block (before the final norm) for ``tokens``, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32).eval()
    captured = {}
    model.model.layers[-1].register_forward_hook(lambda _m, _i, output: captured.update(hidden=output[0]))
    with torch.inference_mode():
        model(torch.tensor([tokens]))
    return captured["hidden"]


def relative_errors(mesh, local):
    """Per position: ||mesh - local|| / ||local||."""
    return ((mesh - local).norm(dim=-1) / local.norm(dim=-1))[0].tolist()
