"""Triton kernels of fastreg, installed as ``fastreg.triton_kernels``.

Each module imports only ``torch`` and ``triton``, so it can be copied into
another codebase on its own.
"""
