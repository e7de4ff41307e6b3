"""Kernels behind the Transformer's inference: decode attention (a Triton kernel on
CUDA, the compiled CPU kernel of ``jetfast._C`` otherwise) and oneDNN linear layers.

Triton is imported only when a kernel is first launched, so ``import jetfast``
stays light and ``TRITON_INTERPRET=1`` can still be set after it.
"""
