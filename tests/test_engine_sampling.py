"""Sampling (seeds, top-k / top-p, distribution) and stopping (stop ids, EOS, stop strings on decoded text)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams, cpu_fused
from rexrag_fast.engine.loaders import load_smollm2_tokenizer, tiny_model
from rexrag_fast.engine.sampling import invert_cdf, sample, truncate_probs
from rexrag_fast.engine.stop import StopChecker


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=3)
    return LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=64, block_size=8))


def prompt(tokenizer, text: str = "Question: who wrote the book? <search>") -> list[int]:
    return tokenizer.encode(text)


@pytest.mark.parametrize("top_p,others_top_p", [(0.95, 1.0), (1.0, 0.9)])
def test_same_seed_same_tokens_whatever_the_batch(engine, tokenizer, top_p, others_top_p):
    """Also a plain-temperature row batched with top-p rows, and the other way round."""
    p = prompt(tokenizer)
    sp = SamplingParams(temperature=1.0, top_p=top_p, max_tokens=16, stop=(), seed=123)
    alone = engine.generate([Request(p, sp)])[0]
    others = [Request(prompt(tokenizer, f"Other prompt number {i} with some words"),
                      SamplingParams(temperature=0.8, top_p=others_top_p, max_tokens=5 + i, stop=(), seed=i))
              for i in range(4)]
    batched = engine.generate(others[:2] + [Request(p, sp)] + others[2:])[2]
    assert batched.output_token_ids == alone.output_token_ids
    assert batched.output_logprobs == pytest.approx(alone.output_logprobs, abs=1e-5)
    other_seed = engine.generate([Request(p, SamplingParams(temperature=1.0, max_tokens=16, stop=(), seed=124))])[0]
    assert other_seed.output_token_ids != alone.output_token_ids


def test_unseeded_requests_follow_torch_manual_seed(engine, tokenizer):
    reqs = [Request(prompt(tokenizer), SamplingParams(temperature=1.0, max_tokens=8, stop=()))] * 2
    torch.manual_seed(7)
    a = engine.generate(reqs)
    torch.manual_seed(7)
    b = engine.generate(reqs)
    assert [o.output_token_ids for o in a] == [o.output_token_ids for o in b]
    assert a[0].output_token_ids != a[1].output_token_ids  # two draws, two seeds


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=5.0)])
def test_degenerate_truncation_is_greedy(engine, tokenizer, params):
    p = prompt(tokenizer)
    greedy = engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=10, stop=()))])[0]
    kw = {"temperature": 1.0, **params}
    out = engine.generate([Request(p, SamplingParams(max_tokens=10, stop=(), seed=1, **kw))])[0]
    assert out.output_token_ids == greedy.output_token_ids


def test_truncate_probs():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    assert truncate_probs(probs, 2, 1.0).tolist() == pytest.approx([0, 0.4, 0, 0.3, 0])
    # nucleus 0.8: 0.4 + 0.3 = 0.7 < 0.8, so 0.15 joins; 0.85 >= 0.8 stops there
    assert truncate_probs(probs, -1, 0.8).tolist() == pytest.approx([0, 0.4, 0, 0.3, 0.15])
    assert truncate_probs(probs, 3, 0.5).tolist() == pytest.approx([0, 0.4, 0, 0.3, 0])


def test_truncate_probs_takes_one_setting_per_row():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 40) * 2, -1)
    ks, ps = [3, -1, 1, 40, 7], [1.0, 0.6, 0.9, 0.95, 0.3]
    batched = truncate_probs(probs, torch.tensor(ks), torch.tensor(ps))
    for row, k, p in zip(range(5), ks, ps):
        assert torch.equal(batched[row], truncate_probs(probs[row], k, p))
        kept = batched[row] > 0
        order = torch.argsort(probs[row], descending=True)
        n_kept = int(kept.sum())
        assert kept[order[:n_kept]].all()  # the kept tokens are the most probable ones
        if k != -1:
            assert n_kept <= k
        assert probs[row][order[:n_kept - 1]].sum() < p or p == 1.0  # nothing kept past the nucleus
    assert torch.equal(truncate_probs(probs, -1, 1.0), probs)


@pytest.mark.skipif(not cpu_fused.available(), reason="the C++ sampler is not built")
@pytest.mark.parametrize("vocab", [7, 64, 1000])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_torch_and_cpp_samplers_invert_the_same_cdf(vocab, temperature):
    """The batched torch sampler (GPU, top-k / top-p rows) and the C++ one draw the same token for the same
    uniform, except where rounding puts u x mass within 1e-5 of a CDF step."""
    torch.manual_seed(vocab)
    logits = torch.randn(32, vocab) * 3
    uniforms = torch.rand(32)
    cpp_tokens, cpp_logprobs = cpu_fused.sample_rows(logits, [temperature] * 32, uniforms.tolist())
    probs = torch.softmax(logits / temperature, -1)
    tokens = invert_cdf(probs, uniforms)
    cdf = torch.cumsum(probs.double(), -1)
    for row in range(32):
        if tokens[row] != cpp_tokens[row]:
            assert (cdf[row] - uniforms[row].double()).abs().min() < 1e-5, row
    logprobs = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(cpp_tokens)[:, None])[:, 0]
    assert cpp_logprobs == pytest.approx(logprobs.tolist(), abs=1e-5)


def test_invert_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0]])
    assert invert_cdf(probs, torch.tensor([0.0, 0.0])).tolist() == [1, 0]  # zero-mass tokens never drawn
    assert invert_cdf(probs, torch.tensor([0.5, 0.25])).tolist() == [3, 2]
    assert invert_cdf(probs * 3, torch.tensor([0.5, 0.25])).tolist() == [3, 2]  # unnormalised is fine
    # u x total at the last partial sum (rounding): the most probable token, as in the C++ sampler
    assert invert_cdf(probs, torch.tensor([1.0, 1.0])).tolist() == [1, 2]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.5, -1, 1.0), (1.0, 3, 1.0), (1.0, -1, 0.7)])
def test_sample_frequencies_follow_the_distribution(temperature, top_k, top_p):
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0]])
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, stop=())
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(6)
    for _ in range(n):
        tok, lp = sample(logits, [sp], [gen])
        counts[tok[0]] += 1
    expected = truncate_probs(torch.softmax(logits[0] / temperature, -1), top_k, top_p)
    expected = expected / expected.sum()
    assert (counts[expected == 0] == 0).all()
    # 4000 draws: binomial std <= 0.008; 0.03 is > 3.5 std
    assert torch.allclose(counts / n, expected, atol=0.03)
    assert lp[0] == pytest.approx(torch.log_softmax(logits[0] / temperature, -1)[tok[0]].item(), abs=1e-6)


MIXED_ROWS = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_k=20),
              dict(temperature=1.2, top_p=0.9), dict(temperature=0.7, top_k=50, top_p=0.8)]


def test_rows_of_a_mixed_batch_sample_as_they_do_alone():
    """Greedy, plain temperature, top-k, top-p and both in one batch: each row's token and logprob are those it
    gets alone with the same generator, step after step; a truncated row draws only tokens truncate_probs
    keeps; the same seeds repeat the tokens, other seeds do not."""
    logits = 3 * torch.randn(len(MIXED_ROWS), 3001, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(stop=(), **kw) for kw in MIXED_ROWS]
    seeded = lambda base: [torch.Generator().manual_seed(base + i) for i in range(len(params))]
    batch_gens, alone_gens, again_gens, other_gens = seeded(100), seeded(100), seeded(100), seeded(200)
    runs = {"batch": [], "again": [], "other": []}
    for _ in range(6):
        tokens, logprobs = sample(logits, params, batch_gens)
        for i, p in enumerate(params):
            assert sample(logits[i:i + 1], [p], [alone_gens[i]]) == ([tokens[i]], [logprobs[i]])
            if not p.greedy:
                assert truncate_probs(torch.softmax(logits[i] / p.temperature, -1), p.top_k, p.top_p)[tokens[i]] > 0
        assert tokens[0] == int(torch.argmax(logits[0]))
        runs["batch"].append(tokens)
        runs["again"].append(sample(logits, params, again_gens)[0])
        runs["other"].append(sample(logits, params, other_gens)[0])
    assert runs["again"] == runs["batch"]
    for i in range(1, len(params)):  # every sampled row: another seed, other tokens
        assert [t[i] for t in runs["other"]] != [t[i] for t in runs["batch"]]


def test_stop_checker_stops_on_the_completing_token(tokenizer):
    text = "I should look it up. <search> capital of France </search> and then more text"
    ids = tokenizer.encode(text)
    checker = StopChecker(SamplingParams(stop=("</search>", "</answer>")), tokenizer, prompt_len=0)
    for i in range(1, len(ids) + 1):
        reason, stop_str = checker.check(ids[:i], ids[i - 1], frozenset())
        if reason is not None:
            break
    assert (reason, stop_str) == ("stop", "</search>")
    decoded = tokenizer.decode(ids[:i])
    assert decoded.rstrip().endswith("</search>")
    assert "</search>" not in tokenizer.decode(ids[: i - 1])


def test_stop_string_in_generated_text(engine, tokenizer):
    p = prompt(tokenizer)
    free = engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=24, stop=()))])[0]
    pieces = [tokenizer.decode([t]) for t in free.output_token_ids]
    # a stop string made of the text of output tokens 6..7, cut so that it starts inside token 6
    stop = (pieces[6] + pieces[7])[-4:] if len(pieces[6] + pieces[7]) >= 4 else pieces[6] + pieces[7]
    first = free.text.find(stop)
    out = engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=24, stop=(stop, "</never>")))])[0]
    assert out.finish_reason == "stop" and out.stop_str == stop
    assert out.text.find(stop) == first
    assert out.output_token_ids == free.output_token_ids[: len(out.output_token_ids)]
    assert stop in out.text and stop not in tokenizer.decode(out.output_token_ids[:-1])


def test_stop_token_ids_and_eos(tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=3)
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=64, block_size=8))
    p = prompt(tokenizer)
    free = engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=20, stop=(), ignore_eos=True))])[0]
    target = free.output_token_ids[5]
    cut = free.output_token_ids.index(target) + 1
    out = engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=20, stop=(),
                                                     stop_token_ids=(target,)))])[0]
    assert out.finish_reason == "stop" and out.stop_str is None
    assert out.output_token_ids == free.output_token_ids[:cut]  # the stop id itself is kept

    model.config.eos_token_id = target
    eos_engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=64, block_size=8))
    assert target in eos_engine.eos_token_ids and tokenizer.eos_token_id in eos_engine.eos_token_ids
    out = eos_engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=20, stop=()))])[0]
    assert out.finish_reason == "eos" and out.output_token_ids == free.output_token_ids[:cut]
    ignored = eos_engine.generate([Request(p, SamplingParams(temperature=0.0, max_tokens=20, stop=(),
                                                             ignore_eos=True))])[0]
    assert ignored.finish_reason == "length" and ignored.output_token_ids == free.output_token_ids
