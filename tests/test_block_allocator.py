"""BlockAllocator: allocation order, reference counting, and every misuse raising CacheError atomically."""

from __future__ import annotations

import numpy as np
import pytest

from rexrag_fast.cache import BlockAllocator, CacheError


def state(alloc: BlockAllocator) -> tuple[int, list[int]]:
    return alloc.num_free, [alloc.refcount(b) for b in range(alloc.num_blocks)]


def test_cache_error_is_value_and_runtime_error() -> None:
    assert issubclass(CacheError, ValueError) and issubclass(CacheError, RuntimeError)


@pytest.mark.parametrize("num_blocks", [0, 1, 7])
def test_fresh_allocator_hands_out_ids_in_order(num_blocks: int) -> None:
    alloc = BlockAllocator(num_blocks)
    assert alloc.num_blocks == num_blocks and alloc.num_free == num_blocks
    got = alloc.allocate(num_blocks)
    assert got.dtype == np.int32 and got.tolist() == list(range(num_blocks))
    assert alloc.num_free == 0
    assert all(alloc.refcount(b) == 1 for b in range(num_blocks))
    empty = alloc.allocate(0)
    assert empty.dtype == np.int32 and empty.shape == (0,)
    alloc.check_invariants()


def test_free_list_is_lifo() -> None:
    alloc = BlockAllocator(6)
    a = alloc.allocate(4)
    alloc.free([a[1], a[3]])
    assert alloc.num_free == 4
    assert alloc.allocate(3).tolist() == [3, 1, 4]
    alloc.check_invariants()


def test_incref_shares_and_free_drops_one_reference() -> None:
    alloc = BlockAllocator(4)
    (b,) = alloc.allocate(1)
    alloc.incref([b, b])
    assert alloc.refcount(b) == 3
    alloc.free([b])
    assert alloc.refcount(b) == 2 and alloc.num_free == 3
    alloc.free(np.array([b, b], dtype=np.int64))
    assert alloc.refcount(b) == 0 and alloc.num_free == 4
    alloc.check_invariants()


@pytest.mark.parametrize(
    "blocks",
    [[0, 1], (0, 1), np.array([0, 1], np.int32), np.array([0, 1], np.int64), np.array([0, 1], np.uint8),
     np.array([0, 9, 1, 9], np.int32)[::2], [np.int64(0), np.int32(1)],
     np.frombuffer(b"\x00" + np.array([0, 1], np.int32).tobytes(), dtype=np.int32, offset=1),
     np.array([0, 1], dtype=">i4")],
    ids=["list", "tuple", "int32", "int64", "uint8", "strided", "numpy-scalars", "misaligned", "big-endian"],
)
def test_free_accepts_lists_and_integer_arrays(blocks) -> None:
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    alloc.free(blocks)
    assert alloc.num_free == 3
    alloc.check_invariants()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a: a.allocate(5), r"asked for 5 blocks but only 1 of 4 are free"),
        (lambda a: a.allocate(-1), r"n=-1 must be >= 0"),
        (lambda a: a.free([3]), r"block 3: it is already free \(double free\)"),
        (lambda a: a.free([0, 0]), r"block 0: it is freed 2 times but callers hold only 1"),
        (lambda a: a.free([4]), r"block id 4 out of range \[0, 4\)"),
        (lambda a: a.free([-1]), r"block id -1 out of range"),
        (lambda a: a.free([1, 2, 3]), r"block 3"),
        (lambda a: a.incref([3]), r"block 3 is free"),
        (lambda a: a.incref([0, 99]), r"block id 99 out of range"),
        (lambda a: a.refcount(4), r"block id 4 out of range"),
        (lambda a: a.free([0.5]), r"blocks\[0\] must be an int, got float"),
        (lambda a: a.free(np.array([0.0])), r"must hold integers, got dtype float64"),
        (lambda a: a.free(np.zeros((1, 1), np.int32)), r"must be 1-D, got an array with ndim=2"),
        (lambda a: a.free(np.array([2**40], np.int64)), r"does not fit in int32"),
        (lambda a: a.free(np.array([2**63 + 1], np.uint64)), r"does not fit in int32"),
        (lambda a: a.free([2**70]), r"does not fit in int32"),
        (lambda a: a.free("01"), r"must be a list/tuple of ints or a 1-D integer numpy array, got str"),
        (lambda a: a.free(None), r"got NoneType"),
    ],
)
def test_misuse_raises_and_changes_nothing(call, match: str) -> None:
    alloc = BlockAllocator(4)
    alloc.allocate(3)  # blocks 0, 1, 2 held once; block 3 free
    before = state(alloc)
    with pytest.raises(CacheError, match=match):
        call(alloc)
    assert state(alloc) == before
    alloc.check_invariants()


@pytest.mark.parametrize("num_blocks", [-1, 2**31])
def test_bad_pool_size_raises(num_blocks: int) -> None:
    with pytest.raises(CacheError, match=f"num_blocks={num_blocks}"):
        BlockAllocator(num_blocks)


def test_random_alloc_free_sequences_keep_invariants(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alloc = BlockAllocator(32)
    held: list[int] = []  # one entry per caller reference
    for _ in range(400):
        op = rng.integers(3)
        if op == 0:
            n = int(rng.integers(0, 6))
            if n <= alloc.num_free:
                held += alloc.allocate(n).tolist()
            else:
                with pytest.raises(CacheError):
                    alloc.allocate(n)
        elif op == 1 and held:
            b = held[int(rng.integers(len(held)))]
            alloc.incref([b])
            held.append(b)
        elif held:
            b = held.pop(int(rng.integers(len(held))))
            alloc.free([b])
        counts = np.bincount(np.array(held, dtype=np.int64), minlength=32)
        assert [alloc.refcount(b) for b in range(32)] == counts.tolist()
        assert alloc.num_free == int((counts == 0).sum())
        alloc.check_invariants()
