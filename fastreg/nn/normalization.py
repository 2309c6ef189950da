"""LayerNorm, RMSNorm and GroupNorm modules: torch's classes with fastreg's forward; the
fused dropout + residual add + norm blocks of pre-norm transformers; GroupNorm + SiLU."""

import torch

from fastreg import functional as F


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class DropoutAddLayerNorm(torch.nn.LayerNorm):
    """LayerNorm(residual + Dropout(p)(x)) over the last dim; state_dict and init are LayerNorm's.

    forward(x, residual=None) returns the output, or (output, h) when prenorm.
    """

    def __init__(self, hidden_size: int, p: float = 0.0, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, prenorm: bool = False, residual_in_fp32: bool = False, device=None, dtype=None):
        super().__init__(hidden_size, eps, elementwise_affine, bias, device, dtype)
        if p < 0.0 or p > 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.prenorm, self.residual_in_fp32 = p, prenorm, residual_in_fp32

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return F.dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, self.eps, self.training,
                                        self.prenorm, self.residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"


class DropoutAddRMSNorm(torch.nn.RMSNorm):
    """RMSNorm(residual + Dropout(p)(x)) over the last dim; state_dict and init are RMSNorm's."""

    def __init__(self, hidden_size: int, p: float = 0.0, eps: float | None = None, elementwise_affine: bool = True,
                 prenorm: bool = False, residual_in_fp32: bool = False, device=None, dtype=None):
        super().__init__(hidden_size, eps, elementwise_affine, device, dtype)
        if p < 0.0 or p > 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.prenorm, self.residual_in_fp32 = p, prenorm, residual_in_fp32

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return F.dropout_add_rms_norm(x, residual, self.weight, self.p, self.eps, self.training,
                                      self.prenorm, self.residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}"


class GroupNorm(torch.nn.GroupNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormSiLU(GroupNorm):
    """SiLU(GroupNorm(x)) in one pass (the diffusion-UNet block); arguments, parameters,
    state_dict and init are GroupNorm's. Backward recomputes the activation."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation="silu")
