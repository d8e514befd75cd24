"""A petals inference session left open on purpose, as a client in the middle of a generation holds one."""

from __future__ import annotations


def open_session_after_steps(client, prompt: list[int], later_tokens: list[int]):
    """Enter an inference session through ``client`` (a MeshClient), send the prompt, then one step per later
    token, and never exit it. Returns the context manager: keep a reference, since collecting it would close
    the session."""
    import torch

    client.warm()
    model = client._model
    embed = model.get_input_embeddings()
    opened = model.inference_session(max_length=len(prompt) + len(later_tokens))
    session = opened.__enter__()
    with torch.inference_mode():
        session.step(embed(torch.tensor([prompt])))
        for token in later_tokens:
            assert session.step(embed(torch.tensor([[token]]))).shape[:2] == (1, 1)
    return opened
