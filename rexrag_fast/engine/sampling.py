"""Token choice from logits: greedy or temperature / top-k / top-p sampling with a generator per request.

logprob(token) = log_softmax(logits / T)[token] in fp32 with T = temperature (T = 1 when greedy), taken
before top-k / top-p truncation: the behaviour policy that verl's actor recomputes as old_log_prob.
Sampling: p = softmax(logits / T); keep the k largest (top_k, with the ties of the k-th); of those, keep the
smallest set of largest tokens whose mass reaches top_p (truncate_probs); renormalise; draw with the
request's own torch.Generator, so a seeded request draws the same tokens whatever else is in the batch.
On CPU every row goes through the C++ sampler (cpu_fused.sample_rows) when the extension is built: the draw
inverts the CDF of the kept terms, in vocabulary order, at one uniform from the request's generator, so the
same seed gives the same token in any batch there too (not the token torch.multinomial would draw). Ties at
the top-p cut go to the lower token index there; torch.sort leaves their order unspecified. The torch path
(_sample_torch) is the reference and serves other devices.
"""

from __future__ import annotations

import torch

from rexrag_fast.engine import cpu_fused
from rexrag_fast.engine.config import SamplingParams


def truncate_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """probs [V] -> probs with everything outside top-k / the top-p nucleus set to 0 (not renormalised)."""
    if top_k != -1 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        drop = mass_before >= top_p  # the first token always stays (mass_before = 0)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits [B, V] (fp32) -> (token ids [B], their log-probs [B]).

    Greedy rows take argmax(logits); the others draw from the truncated distribution with generators[i].
    Every row takes the same path whatever else is in the batch: the C++ sampler on CPU, torch elsewhere.
    """
    if logits.device.type == "cpu" and cpu_fused.available():
        return _sample_cpp(logits.contiguous(), params, generators)
    return _sample_torch(logits, params, generators)


def _sample_cpp(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    temperatures = [0.0 if p.greedy else p.temperature for p in params]
    uniforms = [0.0 if p.greedy else float(torch.rand(1, generator=g)) for p, g in zip(params, generators)]
    return cpu_fused.sample_rows(logits, temperatures, uniforms, [p.top_k for p in params],
                                 [p.top_p for p in params])


def _sample_torch(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                         dtype=torch.float32, device=logits.device)
    logprobs = torch.log_softmax(logits.float() / temps.unsqueeze(1), dim=-1)  # [B, V]
    tokens = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = truncate_probs(logprobs[i].exp(), p.top_k, p.top_p)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist()
