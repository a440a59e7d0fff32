"""The transformers reference the engine is checked and benchmarked against: greedy generate, full-forward log-probs."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers `generate(do_sample=False)` of one prompt, never stopping early: [max_new_tokens] ids."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logprobs(model: Any, token_ids: list[int], prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] of one full forward at each output position.

    Returns [len(token_ids) - prompt_len] fp32 on the CPU.
    """
    logits = model(torch.tensor([token_ids], device=model.device)).logits[0].float()
    lp = torch.log_softmax(logits[prompt_len - 1:-1] / temperature, dim=-1)
    target = torch.tensor(token_ids[prompt_len:], device=lp.device).unsqueeze(1)
    return lp.gather(1, target).squeeze(1).cpu()
