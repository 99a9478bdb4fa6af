"""DGE's analytic MACs per block, written with the cost layer's rules (:mod:`vitconvert.layers.costs`) and the
family's reading of the block's attention (:class:`~vitconvert.backbones.family.QueryAttention`), so a reported
per-image GMACs figure equals :func:`~vitconvert.layers.costs.count_macs` of the path taken, to the MAC.

A block's DGE path costs ``fixed + per_query * Nq`` (plus, with a convolution in the MLP, that convolution at the
scales the image's regions chose, counted by :func:`~vitconvert.layers.scale_conv.dwconv_macs`); ``dense`` is the
base block.
"""

from __future__ import annotations

from torch import nn

from vitconvert.backbones.family import ConvMlp, QueryAttention, norm_cost
from vitconvert.layers.costs import conv_macs, linear_macs, token_macs


def block_costs(norm1: nn.Module, norm2: nn.Module, attention: QueryAttention, mlp: nn.Module, conv: ConvMlp | None,
                tokens: int, grid: tuple[int, int], post_norm: bool = False) -> dict[str, float]:
    """MACs of one block on ``tokens`` tokens (prefix included) over ``grid``; ``post_norm``: norm1 runs on the
    attention outputs (one per query row), not on every token before the keys.

    Returns:
        ``fixed`` and ``per_query`` (the DGE path: norm1 of every token and the keys and values, then per query row
        its norms, attention and MLP), ``core`` (the attention core's share of ``per_query``), ``dense`` (the base
        block), and what the execution cost model reads:
        ``tokens``, ``width``, ``hidden``, ``mlp_row`` (what the dense path runs once per query: the whole MLP, or
        only ``fc2`` after a convolution) and ``dense_conv`` (the MLP's convolution at full resolution).
    """
    n, c = tokens, attention.width
    ln1, ln2 = norm_cost(norm1, c), norm_cost(norm2, c)
    per_row = ln1 + attention.query_macs(attention.key_tokens(n, grid)) + ln2 + token_macs(mlp)
    kv = attention.kv_macs(n, grid)
    if conv is None:
        hidden = max((m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)), default=c)
        mlp_row, dense_conv = token_macs(mlp), 0.0
    else:
        hidden = conv.fc1.out_features
        mlp_row, dense_conv = linear_macs(1, hidden, c), conv_macs(n, conv.dwconv)
    keys = attention.key_tokens(n, grid)
    core = attention.query_macs(keys) - attention.query_macs(0)  # QK^T and AV of one query row
    return {"fixed": (0.0 if post_norm else n * ln1) + kv, "per_query": per_row, "core": core,
            "dense": n * per_row + kv + dense_conv,
            "tokens": float(n), "width": float(c), "hidden": float(hidden), "mlp_row": mlp_row,
            "dense_conv": dense_conv}
