"""fastreg's operators, one module per op family: the fake kernels, the Triton
implementations of the `<op>_triton` twins, autograd, and each op's backend table
({"cpu", "cuda", "triton", "torch"} -> callable). Schemas live in csrc/ops.cpp.
Importing this package registers everything."""

from fastreg.ops import batch_norm, cross_entropy, drop_block, dropout, group_norm, noise, norm, optim  # noqa: F401
