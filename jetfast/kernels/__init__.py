"""Triton kernels and the torch ops that expose them.

Triton is imported only when a kernel is first launched, so ``import jetfast``
stays light and ``TRITON_INTERPRET=1`` can still be set after it.
"""
