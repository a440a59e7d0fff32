"""Triton kernels, installed as rexrag_fast.kernels.

Nothing here imports rexrag_fast: each kernel module exposes `@triton.jit` functions and a
thin launcher; argument checking and the PyTorch references live in rexrag_fast/ops/.
Set TRITON_INTERPRET=1 before importing these modules to run them on the CPU.
"""
