"""FLOPs of a (reduced) ViT, in GMACs (multiply-accumulates, the unit ViT papers report).

- `analytic_macs`: counted per layer from the token counts alone: no forward pass, so calibration
  can price thousands of schedules. Counts what torch's FlopCounterMode counts: matrix products
  (linear layers, attention QK^T and AV, the patch-embedding convolution, the method's own
  matching matmul, the one-hot merge matmul where that formulation is chosen).
- `measured_macs`: one forward under torch's `FlopCounterMode`. torch has no FLOP formula for the
  CPU fused-attention op (``aten._scaled_dot_product_flash_attention_for_cpu``), so without help it
  silently skips attention (DeiT-S reads 4.24 instead of 4.60 GMACs); we register torch's own
  ``sdpa_flop_count`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from .reduce import LayerSpec


@dataclass(frozen=True)
class LayerMacs:
    tokens_in: int
    tokens_out: int
    attention: int
    reduction: int
    mlp: int

    @property
    def total(self) -> int:
        return self.attention + self.reduction + self.mlp


@dataclass(frozen=True)
class MacsReport:
    embed: int
    head: int
    layers: tuple[LayerMacs, ...]

    @property
    def total(self) -> int:
        return self.embed + self.head + sum(layer.total for layer in self.layers)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def analytic_macs(dims, removed: Sequence[int], method=None, formulation: str = "scatter") -> MacsReport:
    """MACs per image for a ViT described by `dims` (adapter's `Dims`) removing `removed[i]` at block i."""
    n = dims.n_tokens
    layers = []
    for i, r in enumerate(removed):
        attn = n * dims.attn_linear_macs[i] + 2 * n * n * dims.attn_dims[i]
        red = 0
        if r > 0 and method is not None:
            red = method.overhead_macs(LayerSpec(
                layer=i, n_tokens=n, amount=r, protected=dims.protected, embed_dim=dims.embed_dim,
                num_heads=dims.attn_dims[i] // dims.head_dims[i], head_dim=dims.head_dims[i]))
            if formulation == "onehot" and not method.dense:
                red += n * (n - r) * (dims.embed_dim + 1)
        m = n - r
        layers.append(LayerMacs(n, m, attn, red, m * dims.mlp_linear_macs[i]))
        n = m
    return MacsReport(dims.embed_macs, dims.head_macs, tuple(layers))


_CPU_SDPA = "_scaled_dot_product_flash_attention_for_cpu"


def _register_cpu_sdpa_formula() -> None:
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, _CPU_SDPA, None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # shapes: the registry passes shapes


def measured_macs(model: torch.nn.Module, input_size: Sequence[int], batch: int = 1) -> int:
    """MACs per image of one forward pass, measured by torch's FlopCounterMode."""
    _register_cpu_sdpa_formula()
    x = torch.randn(batch, *input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2 // batch
