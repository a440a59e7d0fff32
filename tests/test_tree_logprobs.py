"""The forward over a tree pack equals the flat pass: per-trajectory log-probs and entropies (fp32, 1e-5) and
the parameter gradients of the policy loss, for random trees and through the actor's PolicyLogprobs."""

from __future__ import annotations

import random

import pytest
import torch
from tree_helpers import random_tree_sequences

from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.ops.attention_masks import tree_attention_mask
from rexrag_fast.ops.policy_loss import fused_policy_loss
from rexrag_fast.ops.tree_logprobs import tree_logprobs
from rexrag_fast.testing import TensorMemoryTracker, assert_close
from rexrag_fast.train.actor import PolicyLogprobs, forward_inputs
from rexrag_fast.train.packing import build_token_tree, pack_sequences, pack_tree

VOCAB = 61


def _model(attn: str, tie: bool = False) -> torch.nn.Module:
    return tiny_model("qwen2", vocab_size=VOCAB, seed=3, hidden_size=32, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, attn_implementation=attn)


def _sequences(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [s for _ in range(2) for s in random_tree_sequences(rng, VOCAB, max_sequences=10)]


def test_mask_is_the_ancestor_relation() -> None:
    tree = build_token_tree([[1, 2, 3], [1, 2, 4], [1, 5], [6]])
    # preorder: 1, 2, 3, 4, 5, 6 -> nodes 0..5; 3 and 4 are children of 2, 5 of 1, 6 a second root
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree_attention_mask(tree.subtree_end), expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_logprobs_equal_flat(attn: str, fused: bool, seed: int) -> None:
    model = _model(attn)
    seqs = _sequences(seed)
    flat = pack_tree(seqs)
    tree = flat.tree
    assert tree.num_nodes < flat.num_tokens  # the group's prompt at least is shared
    policy = PolicyLogprobs(model, fused=fused, temperature=0.7, compute_entropy=True)
    with torch.no_grad():
        lp_flat, ent_flat = policy(flat.input_ids, flat.position_ids, flat.cu_seqlens)
        lp_tree, ent_tree = policy(*forward_inputs(flat))
    assert_close(lp_tree, lp_flat, torch.float32, atol=1e-5, rtol=1e-5, name="logprobs")
    assert_close(ent_tree, ent_flat, torch.float32, atol=1e-5, rtol=1e-5, name="entropy")
    assert torch.equal(lp_tree[flat.cu_seqlens[:-1].long()], torch.zeros(flat.num_sequences))


def test_sdpa_gets_one_additive_mask_for_all_layers() -> None:
    """A bool mask would be turned into an additive fp32 copy by sdpa in every layer and kept for the
    backward; the additive mask `auto` builds is one tensor for all layers: same log-probs, and the peak of a
    forward + backward lower by at least (layers - 1) such copies (TensorMemoryTracker counts bytes exactly)."""
    layers = 4
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=3, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                       max_position_embeddings=512, attn_implementation="sdpa")
    tree = build_token_tree([s + [i % VOCAB] * 40 for i, s in enumerate(_sequences(0))])
    n = tree.num_nodes
    args = (model, tree.input_ids, tree.position_ids, tree.parent, tree.subtree_end)
    peak, logprobs = {}, {}
    for mask in ("auto", "bool"):
        model.zero_grad()
        with TensorMemoryTracker() as tracker:
            logprobs[mask] = tree_logprobs(*args, mask=mask)
            logprobs[mask].sum().backward()
        peak[mask] = tracker.peak_bytes
    assert_close(logprobs["auto"], logprobs["bool"], torch.float32, atol=1e-6, rtol=1e-6, name="logprobs")
    assert peak["bool"] - peak["auto"] >= (layers - 1) * n * n * 4, (n, peak)


def test_shared_node_gives_each_child_its_own_logprob() -> None:
    model = _model("sdpa")
    seqs = [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7]]  # node of 7 has two children and ends a sequence
    tree = build_token_tree(seqs)
    with torch.no_grad():
        per_node = tree_logprobs(model, tree.input_ids, tree.position_ids, tree.parent, tree.subtree_end)
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1]
    logp = torch.log_softmax(logits.float(), -1)
    per_token = per_node[tree.token_node]
    assert_close(per_token[3], logp[8], torch.float32, atol=1e-5, rtol=1e-5, name="log p(8 | 5 6 7)")
    assert_close(per_token[7], logp[9], torch.float32, atol=1e-5, rtol=1e-5, name="log p(9 | 5 6 7)")
    assert per_token[3] != per_token[7]


def _loss_and_grads(model: torch.nn.Module, batch, inputs, fused: bool, backend: str = "torch"
                    ) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    policy = PolicyLogprobs(model, fused=fused, compute_entropy=True)
    lp, ent = policy(*inputs)
    t = batch.per_token
    loss, _ = fused_policy_loss(lp, t["old_logprobs"], t["response_mask"], advantages=t["advantages"],
                                cu_seqlens=batch.cu_seqlens, probe_logprobs=t["probe_logprobs"], alpha=0.3,
                                ref_logprobs=t["ref_logprobs"], kl_coef=0.1, kl_type="low_var_kl",
                                clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                loss_agg_mode="token-mean", backend=backend)
    loss = loss - 0.01 * (ent * t["response_mask"]).sum() / t["response_mask"].sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("seed", [0, 5])
def test_loss_gradients_equal_flat(fused: bool, seed: int) -> None:
    model = _model("sdpa", tie=seed == 5).train()
    model.config.use_cache = False
    seqs = _sequences(seed)
    gen = torch.Generator().manual_seed(seed)
    per_token = {
        "response_mask": [torch.rand(len(s), generator=gen) < 0.6 for s in seqs],
        "old_logprobs": [-torch.rand(len(s), generator=gen) * 5 for s in seqs],
        "ref_logprobs": [-torch.rand(len(s), generator=gen) * 5 for s in seqs],
        "probe_logprobs": [-torch.rand(len(s), generator=gen) * 5 if i % 3 == 0 else torch.full((len(s),), -torch.inf)
                           for i, s in enumerate(seqs)],
        "advantages": [torch.full((len(s),), float(torch.randn(1, generator=gen))) for s in seqs],
    }
    batch = pack_tree(seqs, per_token)
    flat = pack_sequences(seqs, per_token)
    loss_flat, g_flat = _loss_and_grads(model, flat, forward_inputs(flat), fused)
    loss_tree, g_tree = _loss_and_grads(model, batch, forward_inputs(batch), fused)
    assert_close(loss_tree, loss_flat, torch.float32, atol=1e-6, rtol=1e-5, name="loss")
    assert g_flat.keys() == g_tree.keys() and len(g_flat) > 0
    for name in g_flat:
        assert_close(g_tree[name], g_flat[name], torch.float32, atol=1e-5, rtol=1e-4, name=name)



def test_flex_tree_attention_equals_flat() -> None:
    """TREE_ATTENTION (what the actor uses on CUDA): flat packs exactly as sdpa, tree packs through a
    FlexAttention BlockMask with the flat pass's log-probs (FlexAttention has no backward on the CPU)."""
    from rexrag_fast.ops.tree_logprobs import TREE_ATTENTION, enable_flex_tree_attention

    model = _model("sdpa")
    seqs = _sequences(4)
    batch = pack_tree(seqs)
    policy = PolicyLogprobs(model, fused=True, compute_entropy=True)
    with torch.no_grad():
        lp_sdpa, _ = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens)
        enable_flex_tree_attention(model)
        assert model.config._attn_implementation == TREE_ATTENTION
        lp_flat, ent_flat = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens)
        lp_tree, ent_tree = policy(*forward_inputs(batch))
    assert torch.equal(lp_flat, lp_sdpa)
    assert_close(lp_tree, lp_flat, torch.float32, atol=1e-5, rtol=1e-5, name="logprobs")
    assert_close(ent_tree, ent_flat, torch.float32, atol=1e-5, rtol=1e-5, name="entropy")


@pytest.mark.gpu
def test_flex_tree_gradients_equal_flat_on_cuda() -> None:
    from rexrag_fast.ops.tree_logprobs import enable_flex_tree_attention

    model = _model("sdpa").cuda().train()
    enable_flex_tree_attention(model)
    seqs = _sequences(5)
    gen = torch.Generator().manual_seed(5)
    per_token = {
        "response_mask": [torch.rand(len(s), generator=gen) < 0.6 for s in seqs],
        "old_logprobs": [-torch.rand(len(s), generator=gen) * 5 for s in seqs],
        "ref_logprobs": [-torch.rand(len(s), generator=gen) * 5 for s in seqs],
        "probe_logprobs": [torch.full((len(s),), -torch.inf) for s in seqs],
        "advantages": [torch.full((len(s),), float(torch.randn(1, generator=gen))) for s in seqs],
    }
    batch = pack_tree(seqs, per_token).to("cuda")
    flat = pack_sequences(seqs, per_token).to("cuda")
    loss_flat, g_flat = _loss_and_grads(model, flat, forward_inputs(flat), True, backend="auto")
    loss_tree, g_tree = _loss_and_grads(model, batch, forward_inputs(batch), True, backend="auto")
    assert_close(loss_tree, loss_flat, torch.float32, atol=1e-5, rtol=1e-4, name="loss")
    for name in g_flat:
        assert_close(g_tree[name], g_flat[name], torch.float32, atol=1e-4, rtol=1e-3, name=name)
