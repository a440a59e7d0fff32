"""Token choice from logits: greedy or temperature / top-k / top-p sampling with a generator per request.

logprob(token) = log_softmax(logits / T)[token] in fp32 with T = temperature (T = 1 when greedy), taken
before top-k / top-p truncation: the behaviour policy that verl's actor recomputes as old_log_prob.
Sampling: p = softmax(logits / T); keep the k largest (top_k, with the ties of the k-th); of those, keep the
smallest set of largest tokens whose mass reaches top_p (truncate_probs); draw by inverting the kept mass's
CDF, in vocabulary order, at one uniform u in [0, 1) from the request's own CPU torch.Generator
(invert_cdf), so a seeded request draws the same tokens whatever else is in the batch, and both samplers
draw the same token for the same u (up to rounding at a CDF step; not the token torch.multinomial would
draw). On CPU every row goes through the C++ sampler (cpu_fused.sample_rows) when the extension is built;
ties at its top-p cut go to the lower token index, where torch.sort leaves their order unspecified. The
batched torch path (_sample_torch) is the reference and serves other devices: its host-drawn uniforms cost
one copy per step instead of a kernel per row.
"""

from __future__ import annotations

import torch

from rexrag_fast.engine import cpu_fused
from rexrag_fast.engine.config import SamplingParams


def truncate_probs(probs: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """probs [R, V] (or [V]) -> probs with everything outside top-k / the top-p nucleus set to 0 (not
    renormalised). top_k, top_p: one value, or one per row ([R]); top_k -1 (or >= V) and top_p 1.0 are off.

    Top-k keeps every token at least as probable as the k-th largest (ties kept); top-p then keeps, in
    descending order, each token whose mass before it is still < top_p (the first token always stays).
    """
    rows = probs.reshape(-1, probs.shape[-1])
    r, v = rows.shape
    k = torch.as_tensor(top_k, device=rows.device).expand(r).long()
    k = torch.where((k < 0) | (k > v), v, k)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=rows.device).expand(r)
    if bool((p >= 1.0).all()):  # top-k alone: the k-th value from topk, no sort of the vocabulary
        kth = torch.topk(rows, int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        return rows.masked_fill(rows < kth, 0.0).reshape(probs.shape)
    sorted_p, order = torch.sort(rows, dim=-1, descending=True)
    kth = sorted_p.gather(1, (k - 1).unsqueeze(1))
    sorted_p = sorted_p.masked_fill(sorted_p < kth, 0.0)
    mass_before = torch.cumsum(sorted_p, -1) - sorted_p
    # top_p 1.0 is off: rounding can carry the cumulative mass to 1.0 before the last token
    drop = (mass_before >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(rows).scatter_(1, order, sorted_p).reshape(probs.shape)


def invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (not necessarily normalised), uniforms [R] in [0, 1) -> tokens [R]: the first token whose
    cumulative mass (vocabulary order) exceeds u x total mass; the most probable token where rounding leaves
    u x total at or above the last partial sum. The C++ sampler applies the same rule."""
    cdf = torch.cumsum(probs, -1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return torch.where(tokens < probs.shape[-1], tokens, probs.argmax(-1))


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
    """Batched on logits' device: one log_softmax, one truncation for the rows that ask for it, one CDF
    inversion at the rows' uniforms (drawn on the host from each request's generator, one copy)."""
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                         dtype=torch.float32, device=logits.device)
    logprobs = torch.log_softmax(logits.float() / temps.unsqueeze(1), dim=-1)  # [B, V]
    tokens = torch.argmax(logits, dim=-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        probs = logprobs[drawn].exp()
        truncated = [j for j, i in enumerate(drawn) if params[i].top_k != -1 or params[i].top_p < 1.0]
        if truncated:
            rows = [params[drawn[j]] for j in truncated]
            probs[truncated] = truncate_probs(probs[truncated], torch.tensor([p.top_k for p in rows]),
                                              torch.tensor([p.top_p for p in rows]))
        uniforms = torch.tensor([float(torch.rand(1, generator=generators[i])) for i in drawn])
        tokens[drawn] = invert_cdf(probs, uniforms.to(logits.device))
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist()
