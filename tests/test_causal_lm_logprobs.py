"""causal_lm_logprobs on a packed batch equals running each sequence alone through model(...).logits."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rexrag_fast.ops.causal_lm import causal_lm_logprobs
from rexrag_fast.testing import TensorMemoryTracker, assert_close

LENGTHS = [5, 1, 9, 3]  # includes a one-token sequence (no next token at all)


def _tiny_qwen2(attn: str, vocab: int = 211) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def _packed(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def _separate_reference(model, seqs, temperature):
    """Each sequence alone, logits materialised: [T] next-token logprobs and entropies, 0 at each last token."""
    lps, ents = [], []
    for seq in seqs:
        logits = model(input_ids=seq[None]).logits[0].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        lp = torch.zeros(len(seq))
        ent = torch.zeros(len(seq))
        if len(seq) > 1:
            lp = torch.cat([logp[:-1].gather(1, seq[1:, None]).squeeze(1), lp[:1]])
            ent_all = -(logp.exp() * logp).sum(-1)
            ent = torch.cat([ent_all[:-1], ent[:1]])
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_equals_each_sequence_alone(seed, attn, backend, temperature):
    model = _tiny_qwen2(attn)
    seqs, ids, cu = _packed(LENGTHS, model.config.vocab_size)
    lp, ent = causal_lm_logprobs(model, ids, cu_seqlens=cu, temperature=temperature, return_entropy=True,
                                 backend=backend)
    ref_lp, ref_ent = _separate_reference(model, seqs, temperature)
    assert lp.shape == ent.shape == ids.shape
    assert_close(lp, ref_lp, torch.float32, atol=1e-5, rtol=1e-4, name="logprobs")
    assert_close(ent, ref_ent, torch.float32, atol=1e-5, rtol=1e-4, name="entropy")
    last = cu[1:].long() - 1
    assert torch.equal(lp[last], torch.zeros(len(LENGTHS)))


def test_sdpa_pack_gets_one_additive_mask_for_all_layers():
    """transformers would hand sdpa a bool mask for a packed batch, which sdpa turns into an fp32 copy per
    layer kept for the backward; ours is one additive mask: same log-probs, and with 6 layers a peak lower by
    at least 3 such copies (TensorMemoryTracker counts bytes exactly; ~5 minus our own mask and timing)."""
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa"))
    seqs, ids, cu = _packed([300, 200, 250, 1], 97)
    n = ids.numel()
    peak, logprobs = {}, {}
    for ours in (True, False):
        model.zero_grad()
        with TensorMemoryTracker() as tracker:
            if ours:
                lp = causal_lm_logprobs(model, ids, cu_seqlens=cu)
            else:  # transformers' own mask from the position ids
                hidden = model.model(input_ids=ids[None], position_ids=_positions(cu)[None],
                                     use_cache=False).last_hidden_state[0]
                lp = torch.log_softmax(model.lm_head(hidden).float(), -1)[:-1].gather(1, ids[1:, None])[:, 0]
                lp = torch.cat([lp, lp[:1] * 0]).masked_fill(_last_tokens(cu, n), 0.0)
            lp.sum().backward()
        peak[ours], logprobs[ours] = tracker.peak_bytes, lp.detach()
    assert_close(logprobs[True], logprobs[False], torch.float32, atol=1e-5, rtol=1e-5, name="logprobs")
    assert peak[False] - peak[True] >= 3 * n * n * 4, (n, peak)


def _positions(cu):
    return torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])


def _last_tokens(cu, n):
    last = torch.zeros(n, dtype=torch.bool)
    last[cu[1:].long() - 1] = True
    return last


def test_gradients_match_separate_sequences(seed):
    model = _tiny_qwen2("sdpa")
    seqs, ids, cu = _packed(LENGTHS, model.config.vocab_size, seed=1)
    weights = torch.randn(ids.shape[0])
    params = [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight]
    lp, ent = causal_lm_logprobs(model, ids, cu_seqlens=cu, return_entropy=True)
    ours = torch.autograd.grad((lp * weights).sum() + 0.1 * ent.sum(), params)
    ref_lp, ref_ent = _separate_reference(model, seqs, 1.0)
    ref = torch.autograd.grad((ref_lp * weights).sum() + 0.1 * ref_ent.sum(), params)
    for name, a, e in zip(("lm_head", "q_proj", "embed_tokens"), ours, ref):
        assert_close(a, e, torch.float32, atol=1e-5, rtol=1e-4, name=name)


def test_position_ids_equal_cu_seqlens(seed):
    model = _tiny_qwen2("sdpa")
    _, ids, cu = _packed(LENGTHS, model.config.vocab_size, seed=2)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    by_cu = causal_lm_logprobs(model, ids, cu_seqlens=cu)
    by_pos = causal_lm_logprobs(model, ids, position_ids=positions)
    assert torch.equal(by_cu, by_pos)


def test_packing_boundaries_matter(seed):
    """The same tokens as one long sequence give different log-probs: the boundary check can fail."""
    model = _tiny_qwen2("sdpa")
    _, ids, cu = _packed(LENGTHS, model.config.vocab_size, seed=3)
    packed = causal_lm_logprobs(model, ids, cu_seqlens=cu)
    whole = causal_lm_logprobs(model, ids, cu_seqlens=torch.tensor([0, ids.shape[0]], dtype=torch.int32))
    second = slice(LENGTHS[0] + LENGTHS[1], LENGTHS[0] + LENGTHS[1] + LENGTHS[2] - 1)
    assert (packed[second] - whole[second]).abs().max() > 1e-3


def test_bad_arguments_are_named():
    model = _tiny_qwen2("sdpa")
    ids = torch.randint(0, 211, (6,))
    with pytest.raises(ValueError, match="exactly one"):
        causal_lm_logprobs(model, ids)
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_lm_logprobs(model, ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_lm_logprobs(model, ids, cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids"):
        causal_lm_logprobs(model, ids, position_ids=torch.arange(5))
    with pytest.raises(TypeError, match="model"):
        causal_lm_logprobs(torch.nn.Linear(4, 4), ids, position_ids=torch.arange(6))


@pytest.mark.slow
def test_smollm2_packed_equals_each_sequence_alone(seed):
    """The real embedded model (Llama architecture, tied embeddings, sdpa), dequantised from its GGUF file."""
    from transformers import AutoModelForCausalLM

    from rexrag_fast.engine.loaders import SMOLLM2_GGUF, smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32).eval()
    seqs, ids, cu = _packed([12, 1, 20, 7], model.config.vocab_size, seed=4)
    with torch.no_grad():
        lp, ent = causal_lm_logprobs(model, ids, cu_seqlens=cu, return_entropy=True)
        ref_lp, ref_ent = _separate_reference(model, seqs, 1.0)
    assert_close(lp, ref_lp, torch.float32, atol=1e-4, rtol=1e-4, name="logprobs")
    assert_close(ent, ref_ent, torch.float32, atol=1e-4, rtol=1e-4, name="entropy")
