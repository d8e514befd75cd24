"""Plain transformers generation on the same checkpoint: the reference mesh output must equal."""

from __future__ import annotations


def generate_locally(model_path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy new token ids from local transformers, float32."""
    # torch is imported here, not at the top: `farworker demo` imports this module before it sets the thread
    # policy, which must come before torch loads (threading_policy).
    import torch
    from transformers import AutoModelForCausalLM

    from farworker.petals.compat import MODULE_BUILD_LOCK

    with MODULE_BUILD_LOCK:  # not while a coordinator in this process loads a block (compat.MODULE_BUILD_LOCK)
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


def log_softmax_locally(model_path: str, ids: list[int]):
    """Local transformers' log-probabilities at every position of ``ids`` ([positions, vocab], float32): row i is
    the distribution of the token after ids[i]."""
    import torch
    from transformers import AutoModelForCausalLM

    from farworker.petals.compat import MODULE_BUILD_LOCK

    with MODULE_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
