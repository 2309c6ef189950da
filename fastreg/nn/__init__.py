"""Drop-in replacements for torch.nn modules (subclasses overriding forward only)."""

from fastreg.nn.dropout import DropPath, Dropout, Dropout1d, Dropout2d, Dropout3d

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropPath"]
