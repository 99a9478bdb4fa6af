"""Balanced hierarchical clustering of tokens and attention inside the clusters (BOAT's feature-space attention).

Pure tensor code that knows no model (like ToMe's ``merge.py``): it takes per-head queries, keys and values
``(B, heads, N, d)`` and returns attention outputs of the same shape. BOAT (Yu et al., BMVC 2022, arXiv
2201.13027) clusters the queries of each image and head into groups of similar features and lets each group
attend only to itself, so attention costs about ``N x cluster size`` instead of ``N^2``.

**Clustering** (:func:`balanced_clusters`): ``L`` levels of balanced two-way splits. At each level every
current group is split in two: two centroids start as the means of the group's first and second halves in
its current order (raster order at the first level), are L2-normalised, and refined by ``iters`` soft k-means
steps on cosine similarity (assignment = softmax(temperature x similarity), centroid = assignment-weighted
sum of the raw queries, re-normalised). Every token is then scored by ``r = (s0 + 1) / (s1 + 1)`` and the
group is sorted by ``r`` and cut exactly in half, so the clusters are balanced by construction. Everything
runs under ``no_grad``: the result is an index (a permutation), so no gradient could flow through it anyway,
and the soft assignments are not part of the output.

**Token counts** that are not ``cluster_size x 2^k`` (other resolutions, a class token, Swin at 384 px with
12x12 windows) are padded, not rounded: ``L`` is the smallest number of levels whose leaves hold at most
``cluster_size`` tokens, the leaf size is ``ceil(N / 2^L)`` and fewer than ``2^L`` zero tokens are appended.
The padding tokens are scored ``+inf`` at every split, so they gather in the last clusters rather than at
the split boundaries, and they are masked out as keys (a large finite negative logit, so a cluster made only
of padding yields finite, discarded outputs and no NaN gradient).

**Attention** (:func:`clustered_attention`): keys and values follow the queries' permutation. Clusters come
in sibling pairs (``2i``, ``2i + 1``) from the last split; each cluster also attends to the ``overlap``
tokens of its sibling nearest the split boundary (the first ones of ``2i + 1`` for ``2i``, the last ones of
``2i`` for ``2i + 1``), as BOAT does. The pairs are formed inside one (image, head) row, so no token ever
attends to another image's tokens at any batch size (BOAT-CSWin pairs images 2i and 2i + 1 of the batch
when an image is a single cluster, and fails at odd batch sizes). ``num_global`` leading tokens (a ViT's
class and distillation tokens) stay global: their queries attend to every token and every cluster also
attends to them, because a class token confined to one cluster would read only part of the image. The
outputs are put back in the original order with the inverse permutation. An optional float ``bias`` per (query, key)
pair (BEiT's relative position bias) is gathered for the pairs each cluster scores, so they keep their dense logits.

**Dense when clustering does not pay**: when the clustered path would cost at least as many MACs as plain
attention (one cluster holds all tokens, or the clustering overhead eats the saving), the dense
``scaled_dot_product_attention`` runs instead, so one cluster holding all tokens is exactly the base attention.
``overhead`` charges the clustering's sorts and gathers extra MAC-equivalents in that decision only: they are
memory-bound and cost far more time than their MACs (on the benchmark CPU about 500 MAC-equivalents per
token, channel and level, against 10 real MACs), so a caller that must never be slower than dense sets it.

**Speed** (CPU; the clustering moves memory far more than it multiplies): q, k and v are read in place from
the fused qkv projection they are usually views of (no contiguous copies) when no gradient is needed; each
level of the clustering reads the queries six times (initial centroids, two products per soft k-means step,
final scores) and permutes them inside the previous level's groups (a local gather), and the last permutation
leaves them in cluster order for the attention. A soft k-means step needs only ``s0 - s1`` (softmax over two
centroids is a sigmoid of the difference), so it takes one product with the centroid difference instead of
two similarities. The exact cut sorts packed int64 keys ``(bits of r << 32) | slot`` with numpy's SIMD sort
(the stable order of ``r >= 0``, about 5x faster than torch's stable argsort on 3136-token rows). Without global
tokens or padding (Swin) each cluster's keys are one window of consecutive rows of the cluster-ordered keys, so
k and v are gathered once per token and the windows are strided views. The output is un-permuted straight into
a (B, N, heads, d) layout, so merging the heads afterwards is a view. The permutation equals the plain
statement of the algorithm token for token (tested).

**Export**: none of that speed machinery (numpy, reused buffers, ``out=`` writes, rows read through ``as_strided``,
cached index tensors) can be traced, so while ``torch.export`` traces (or inside :func:`traceable_path`)
:func:`clustered_attention` runs a functional twin (:func:`traceable_clusters`, :func:`traceable_clustered_attention`):
the same float32 arithmetic op for op and the same permutation (the stable argsort of ``r``, ties by position), with
the batch size symbolic.

**Cost**: :func:`clustered_attention_macs` counts, per image, exactly the matrix products these functions run
(the clustering's similarity and centroid products, the in-cluster QK^T and AV including padding and the
overlap keys, the global tokens' rows), with the rules of :mod:`vitconvert.layers.costs`, so it agrees with
:func:`vitconvert.layers.costs.count_macs` to the MAC.

Example:
    >>> q = k = v = torch.randn(2, 3, 256, 16)
    >>> clustered_attention(q, k, v, cluster_size=32, overlap=8).shape
    torch.Size([2, 3, 256, 16])
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor

from vitconvert.layers.compiled import graph_tracing
from vitconvert.layers.costs import attention_macs

__all__ = ["ClusterPlan", "balanced_clusters", "clustered_attention", "clustered_attention_macs",
           "clustering_macs", "inverse_permutation", "plan_clusters", "release_workspace",
           "traceable_clustered_attention", "traceable_clusters", "traceable_path", "tracing", "workspace"]

# Soft k-means: BOAT's two refinement steps at temperature 100 on cosine similarity.
DEFAULT_ITERS = 2
DEFAULT_TEMPERATURE = 100.0


# Scratch tensors reused across calls (see workspace): per thread, at most this many bytes each.
WORKSPACE_MAX_BYTES = 256 * 2**20
_WORKSPACE = threading.local()


def workspace(name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised CPU tensor of ``shape`` (``dtype``, default ``like``'s) that is reused by every call with
    this ``name`` on this thread: for temporaries that die before the call returns, in inference only (autograd
    must never save one).

    Why: glibc hands the freed top of its heap back to the kernel once it exceeds a threshold, so a layer whose
    temporaries total a few MB gets fresh pages on every call, and on a virtual machine a page fault costs more
    than the pass that fills the page (measured: an FSLA sub-layer on Swin-T's first stage at batch 1 runs in
    24 ms with fresh temporaries, 17 ms with retained ones). Other devices (their own caching allocators) and
    requests over :data:`WORKSPACE_MAX_BYTES` get a fresh tensor. :func:`release_workspace` frees them all.
    """
    numel = prod(shape)
    dtype = dtype or like.dtype
    if like.device.type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return like.new_empty(shape, dtype=dtype)
    store: dict[tuple[str, torch.dtype], Tensor] = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = store.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype)
        store[(name, dtype)] = buf
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's :func:`workspace` tensors."""
    _WORKSPACE.__dict__.pop("buffers", None)


@dataclass(frozen=True)
class ClusterPlan:
    """How ``tokens`` tokens are clustered: ``levels`` splits into ``2^levels`` leaves of ``leaf`` tokens.

    ``padded = leaf x 2^levels >= tokens``; ``overlap`` is the number of sibling tokens each cluster also
    attends to (0 with a single cluster, at most ``leaf``).
    """

    tokens: int
    levels: int
    leaf: int
    overlap: int

    @property
    def clusters(self) -> int:
        return 2 ** self.levels

    @property
    def padded(self) -> int:
        return self.leaf * self.clusters

    @property
    def keys(self) -> int:
        """Keys each clustered query sees (its own cluster plus the sibling overlap; global tokens not included)."""
        return self.leaf + self.overlap


def plan_clusters(tokens: int, cluster_size: int, overlap: int = 0) -> ClusterPlan:
    """The smallest number of balanced splits that leaves clusters of at most ``cluster_size`` tokens.

    Example:
        >>> plan_clusters(3136, 49, 20)
        ClusterPlan(tokens=3136, levels=6, leaf=49, overlap=20)
        >>> plan_clusters(2304, 64, 20).padded, plan_clusters(100, 200, 20).clusters
        (2304, 1)
    """
    if tokens < 1 or cluster_size < 1 or overlap < 0:
        raise ValueError(f"plan_clusters: need tokens >= 1, cluster_size >= 1, overlap >= 0 "
                         f"(got {tokens}, {cluster_size}, {overlap})")
    levels = 0
    while cluster_size * 2 ** levels < tokens:  # integer loop: no float log2 rounding at exact powers of two
        levels += 1
    leaf = -(-tokens // 2 ** levels)
    return ClusterPlan(tokens=tokens, levels=levels, leaf=leaf, overlap=min(overlap, leaf) if levels else 0)


def _row_source(t: Tensor) -> tuple[Tensor, Tensor, int]:
    """Where the rows of ``t`` (B, h, N, e) are: a 2-D (rows, e) tensor ``src``, the row of ``t[b, j, 0]`` in it
    as ``base`` (B, h) and the step between consecutive tokens, so ``t[b, j, i] == src[base[b, j] + i * step]``.

    q, k and v usually are strided views of one fused qkv projection (B, N, 3, h, e). Copying each to a
    contiguous tensor before gathering from it costs a full read and write of q, k and v (and, at large
    batches, a fresh allocation that the kernel must zero), so when no gradient is needed and every stride is
    a whole number of rows the rows are indexed in the projection's own storage. Otherwise (training, odd
    layouts) ``t`` is flattened with ``reshape``, which copies only when it must; gradients then flow as usual.
    """
    b, h, n, e = t.shape
    s0, s1, s2, s3 = t.stride()
    off = t.storage_offset()
    if (s3 == 1 and not (t.requires_grad and torch.is_grad_enabled())
            and all(v % e == 0 for v in (s0, s1, s2, off)) and s2 > 0):
        total = t.untyped_storage().nbytes() // t.element_size()
        src = t.as_strided((total // e, e), (e, 1), 0)
        return src, _grid(b, h, s0 // e, s1 // e, off // e, t.device), s2 // e
    return t.reshape(b * h * n, e), _grid(b, h, h * n, n, 0, t.device), 1


@functools.lru_cache(maxsize=64)
def _grid(b: int, h: int, step_b: int, step_h: int, start: int, device: torch.device) -> Tensor:
    """``start + i * step_b + j * step_h`` as a (b, h) long tensor, built once per geometry (read-only, a normal
    tensor even when first asked for in inference mode): the row offsets of every (image, head)."""
    with torch.inference_mode(False):
        return start + torch.arange(b, device=device).unsqueeze(1) * step_b + torch.arange(h, device=device) * step_h


def _row_index(base: Tensor, step: int, tokens: Tensor) -> Tensor:
    """Rows of ``src`` (see :func:`_row_source`) holding ``tokens`` (B, h, ...) of each (image, head)."""
    shape = base.shape + (1,) * (tokens.dim() - base.dim())
    return torch.add(base.view(shape), tokens, alpha=step)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[..., perm[..., i]] = i`` along the last dimension."""
    src = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, src)


@torch.no_grad()
def balanced_clusters(q: Tensor, plan: ClusterPlan, iters: int = DEFAULT_ITERS,
                      temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Permutation that puts the tokens of each row in cluster order (see the module docstring).

    Args:
        q: (..., N, d) queries; every leading index (image, head) is clustered on its own.
        plan: From :func:`plan_clusters` with ``plan.tokens == N``.
        iters: Soft k-means refinement steps per split.
        temperature: Sharpness of the soft assignment (BOAT: 100).

    Returns:
        (..., plan.padded) long: token indices in cluster order; cluster ``c`` is positions
        ``c * leaf .. (c + 1) * leaf - 1``; indices ``>= N`` are padding.
    """
    *lead, n, d = q.shape
    if n != plan.tokens:
        raise ValueError(f"balanced_clusters: the plan is for {plan.tokens} tokens, got {n}")
    q4 = q.detach() if q.dim() == 4 else q.detach().reshape(-1, 1, n, d)  # (image, head) rows, no copy
    order, _ = _cluster(q4, plan, iters, temperature, sorted_queries=False)
    return order.view(*lead, plan.padded)


def _cluster(q: Tensor, plan: ClusterPlan, iters: int, temperature: float, sorted_queries: bool
             ) -> tuple[Tensor, Tensor | None]:
    """:func:`balanced_clusters` of q (B, h, N, d) as (B * h, padded) and, if ``sorted_queries``, the queries in
    that order as a (B * h * padded, d) float32 tensor (padding rows zero). Float32 whatever the queries' dtype,
    autocast included (see :func:`_cluster_fp32`)."""
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        return _cluster_fp32(q, plan, iters, temperature, sorted_queries)


def _cluster_fp32(q: Tensor, plan: ClusterPlan, iters: int, temperature: float, sorted_queries: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """:func:`_cluster` in float32, autocast off.

    The time goes into moving memory, so each level touches the queries as few times as the algorithm allows:
    once for the initial centroids, twice per soft k-means step, once for the final scores, and once to gather
    them into the new order. That gather permutes rows inside each group of the previous level's order (local:
    a group of 98 rows is 12 KB), not across the whole image, and the last one leaves the queries in cluster order
    for the attention. Cosine similarities divide the raw products by each token's norm (computed once) instead of
    normalising a copy of the queries; two buffers alternate, with no new allocation per level. Every permutation
    is kept as flat slot indices into the (B * h * padded) rows (what :func:`_sort_groups` returns), so the
    sort's result indexes the queries, their norms and the running order directly (no per-group offsets to add).
    """
    b, h, n, d = q.shape
    rows, np_ = b * h, plan.padded
    # The clustering runs in float32 whatever the queries' dtype (fp16, bf16, autocast, float64): the sort reads
    # r's float32 bits, and in half precision the k-means steps' small differences would round away.
    f32 = torch.float32
    cur = workspace("cluster_a", (rows * np_, d), q, f32)  # no gradient ever flows through these
    x0 = cur.view(b, h, np_, d)
    x0[:, :, :n].copy_(q)
    if np_ > n:  # padding tokens are zero vectors: they add nothing to any centroid
        x0[:, :, n:].zero_()
    nxt = workspace("cluster_b", (rows * np_, d), q, f32) if plan.levels > 1 or sorted_queries else cur
    # 1 / |q| per token (padding: 1e12, always times a zero product).
    inv = torch.linalg.vector_norm(cur, dim=-1).clamp_min_(1e-12).reciprocal_()  # (rows * np_,)
    slots = _arange(rows * np_, q.device)
    # Python numbers in tensor-tensor arithmetic are first made into tensors (an extra op each call): these
    # constants are 0-dim tensors instead (the same float32 values, so the same results).
    temp = _constant(temperature)
    floors = _floors(q.device, f32)
    order = slots  # the flat slot each position's token started in (read-only: only ever indexed)
    pad = (slots.view(rows, np_)[0] >= n).expand(rows, np_).reshape(-1) if np_ > n else None
    for level in range(plan.levels):
        groups = 2 ** level
        size = np_ // groups
        half = size // 2
        rg = rows * groups
        x = cur.view(rg, size, d)  # 3-D batched products (bmm): one kernel call each, no broadcasting views
        xt = x.transpose(1, 2)  # similarities as (2, size) = c @ x^T: faster on CPU than x @ c^T (size, 2)
        inv_g = inv.view(rg, 1, size)
        c = _normalized(x.view(rg, 2, half, d).sum(2))  # means of the two halves (the scale does not matter)
        a = x.new_empty(rg, 2, size)  # soft assignments, rewritten by every step
        for _ in range(iters):
            # softmax(temperature x cosines) over two centroids = sigmoid(temperature x (s0 - s1)), and
            # s0 - s1 = (c0 - c1) . x / |x|: one product with the (tiny) scaled centroid difference instead of
            # two similarities (a matrix-vector product reads x as fast as a 2-row one runs), written straight
            # into the assignment weights' buffer.
            dc = torch.sub(c[:, :1], c[:, 1:]).mul_(temp)  # (rg, 1, d)
            a0 = torch.sigmoid(torch.bmm(dc, xt).mul_(inv_g), out=a[:, :1])
            torch.sub(_ONE, a0, out=a[:, 1:])
            c = _normalized(torch.bmm(a, x))
        # r = (s0 + 1) / (s1 + 1) with s0 + 1 >= +0 (a cosine a rounding error below -1 counts as -1) and s1 + 1
        # >= 1e-6, each step on both rows at once. r >= +0, so its float32 bits, read as int32, sort in the same
        # order as its values (see _sort_groups).
        s = torch.bmm(c, xt).mul_(inv_g).add_(_ONE).clamp_min_(floors)
        r = torch.div(s[:, 0], s[:, 1])
        if pad is not None:  # padding sorts last: away from the boundaries, into the last leaves
            r.masked_fill_(pad.view(rg, size), float("inf"))
        flat = _sort_groups(r, slots)  # (rows * np_,) slots in the new order, each group sorted by r
        order = order.index_select(0, flat) if level else flat
        last = level == plan.levels - 1
        if not last:  # the norms and the padding flags only serve the next level's similarities and scores
            if pad is not None:
                pad = pad.index_select(0, flat)
            inv = inv.index_select(0, flat)
        if not last or sorted_queries:
            torch.index_select(cur, 0, flat, out=nxt)
            cur, nxt = nxt, cur
    # Flat slots -> token index inside each (image, head) row.
    order = order.view(rows, np_) - slots.view(rows, np_)[:, :1] if rows > 1 else order.view(rows, np_)
    return order, (cur if sorted_queries else None)


# Low and high 32-bit halves of an int64 in memory (the packed sort keys of _sort_groups).
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)
_ONE = torch.tensor(1.0)


@functools.lru_cache(maxsize=16)
def _floors(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 2, 1) lower bounds of ``s0 + 1`` and ``s1 + 1`` in the cut's ratio (0 and 1e-6)."""
    with torch.inference_mode(False):
        return torch.tensor([0.0, 1e-6], dtype=dtype, device=device).view(1, 2, 1)


@functools.lru_cache(maxsize=16)
def _constant(value: float) -> Tensor:
    """A 0-dim float32 CPU tensor holding ``value`` (usable with tensors on any device), built once."""
    with torch.inference_mode(False):
        return torch.tensor(value)


def _sort_groups(r: Tensor, slots: Tensor) -> Tensor:
    """The stable ascending order of every row of ``r`` (G, size) (float32, ``r >= +0``), as the flat slots
    ``slots`` (``arange(G * size)``) in that order: ``out[g * size + j] = g * size + argsort(r[g])[j]``.

    ``r >= +0``, so its float32 bits read as int32 order like its values (``+inf`` last). On CPU each key is one
    int64 ``(bits << 32) | slot``: the keys are distinct and order by ``r`` first, then by slot, which is exactly
    the stable order; numpy sorts int64 values with SIMD sorting networks (numpy >= 2: about 5x faster than
    ``torch.argsort(stable=True)`` on Swin-T's 3136-token rows, which sorts (key, index) pairs one comparison at a
    time), and the slot is the key's low half. Other devices use their own stable argsort.
    """
    if r.device.type == "cpu" and slots.numel() < 2 ** 31:
        return _sort_packed(r, slots)
    return _sort_stable(r, slots)


def _sort_packed(r: Tensor, slots: Tensor) -> Tensor:
    """:func:`_sort_groups` on CPU: numpy's sort of packed ``(bits << 32) | slot`` int64 keys."""
    g, size = r.shape
    keys = torch.empty((g, size), dtype=torch.int64)
    words = keys.view(torch.int32).view(g, size, 2)
    words[..., _HI].copy_(r.view(torch.int32))
    words[..., _LO].copy_(slots.view(g, size))
    keys.numpy().sort(axis=-1)  # in place; distinct keys, so any sort algorithm gives the one stable order
    return keys.view(-1).bitwise_and_(0xFFFFFFFF)


def _sort_stable(r: Tensor, slots: Tensor) -> Tensor:
    """:func:`_sort_groups` anywhere: torch's stable argsort of the int32 bits."""
    g, size = r.shape
    idx = r.view(torch.int32).argsort(dim=-1, stable=True)
    return idx.add_(slots.view(g, size)[:, :1]).view(-1)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> Tensor:
    """``torch.arange(n)`` built once per size and device (read-only: only ever indexed or sliced), a normal
    tensor even when first asked for in inference mode, so autograd may save it as an index."""
    with torch.inference_mode(False):
        return torch.arange(n, device=device)


def _normalized(c: Tensor) -> Tensor:
    """``F.normalize(c, dim=-1)`` in place (the same values, fewer kernel calls)."""
    return c.div_(torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min_(1e-12))


def _sibling(t: Tensor, plan: ClusterPlan) -> Tensor:
    """(..., C, leaf, e) -> (..., C, overlap, e): for cluster 2i the first ``overlap`` of 2i + 1, for 2i + 1 the
    last ``overlap`` of 2i (the tokens nearest their split boundary)."""
    n, m = plan.overlap, plan.leaf
    pairs = t.unflatten(-3, (plan.clusters // 2, 2))  # (..., C/2, 2, leaf, e)
    even = pairs[..., 1, :n, :]
    odd = pairs[..., 0, m - n:, :]
    return torch.stack([even, odd], dim=-3).flatten(-4, -3)


def _pays(plan: ClusterPlan, num_global: int, width: int, iters: int, overhead: float = 0.0) -> bool:
    """Whether the clustered path costs less than dense attention over the same tokens: its MACs plus
    ``overhead`` MAC-equivalents per (padded) token, channel and level for the sorts and gathers."""
    if plan.levels == 0:
        return False
    total = plan.tokens + num_global
    dense = attention_macs(total, total, width, width)
    moves = overhead * plan.padded * width * plan.levels
    return _clustered_macs(plan, num_global, width, iters) + moves < dense


def _clustered_macs(plan: ClusterPlan, num_global: int, width: int, iters: int) -> float:
    total = plan.tokens + num_global
    return (clustering_macs(plan, width, iters)
            + attention_macs(plan.padded, num_global + plan.keys, width, width)
            + attention_macs(num_global, total, width, width))


def clustering_macs(plan: ClusterPlan, width: int, iters: int = DEFAULT_ITERS) -> float:
    """MACs of :func:`balanced_clusters` for one image, ``width`` = heads x head dim.

    Per level and token: ``iters`` products with the centroid difference (d each: the soft assignment only
    needs ``s0 - s1``), ``iters`` centroid updates (2 x d) and the final similarities to both centroids (2 x d),
    i.e. ``(3 iters + 2) x padded x width``. Means, norms, softmax and sort are not MACs (fvcore does not count
    them either).
    """
    return float(plan.levels * (3 * iters + 2) * plan.padded * width)


def clustered_attention_macs(tokens: int, width: int, cluster_size: int, overlap: int = 0, num_global: int = 0,
                             iters: int = DEFAULT_ITERS, overhead: float = 0.0) -> float:
    """MACs of :func:`clustered_attention` for one image of ``tokens`` tokens (global ones included).

    This is what the forward really runs: dense attention when clustering does not pay, else the clustering,
    the in-cluster QK^T and AV (padding and overlap keys included) and the global tokens' rows and columns.
    """
    plan = plan_clusters(tokens - num_global, cluster_size, overlap)
    if not _pays(plan, num_global, width, iters, overhead):
        return attention_macs(tokens, tokens, width, width)
    return _clustered_macs(plan, num_global, width, iters)


def _window_attention(qc: Tensor, k: Tensor, v: Tensor, src: Tensor, plan: ClusterPlan, scale: float | None,
                      dropout_p: float) -> Tensor:
    """In-cluster attention without global tokens or padding (inference): (B * h * C/2, 2, leaf, dv) outputs in
    cluster order from the queries ``qc`` (B * h * padded, d) in cluster order and the tokens ``src`` (B, h, padded)
    of each position.

    With keys in cluster order, each cluster's keys are one window of ``leaf + overlap`` consecutive rows: cluster
    2i's own rows followed by the first ``overlap`` rows of 2i + 1, and for 2i + 1 the last ``overlap`` rows of 2i
    followed by its own. So k and v are gathered once per token (not once per key slot: 1 + overlap / leaf times
    fewer rows) and the windows are strided views, sibling pairs as the batch and the two clusters of a pair as
    the heads of one SDPA call. Keys come in another order than on the general path (sibling rows first for odd
    clusters), which changes only the float rounding of the softmax sums.
    """
    d, dv = k.shape[-1], v.shape[-1]
    m, o, pairs = plan.leaf, plan.overlap, src.numel() // (2 * plan.leaf)
    ks, kb, kstep = _row_source(k)
    vs, vb, vstep = _row_source(v)
    kk = torch.index_select(ks, 0, _row_index(kb, kstep, src).view(-1), out=workspace("keys", (src.numel(), d), k))
    vv = torch.index_select(vs, 0, _row_index(vb, vstep, src).view(-1),
                            out=workspace("values", (src.numel(), dv), v))
    kw = kk.as_strided((pairs, 2, m + o, d), (2 * m * d, (m - o) * d, d, 1))
    vw = vv.as_strided((pairs, 2, m + o, dv), (2 * m * dv, (m - o) * dv, dv, 1))
    return F.scaled_dot_product_attention(qc.view(pairs, 2, m, d), kw, vw, dropout_p=dropout_p, scale=scale)


def _pair_bias(bias: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
    """The entries of ``bias`` (broadcastable to (B, heads, N, N)) for the pairs each cluster scores: ``rows``
    (B, heads, C, m) are its query tokens and ``keys`` (B, heads, C, width) its key tokens, both as indices into the
    full sequence (class token included); returns (B, heads, C, m, width), for cluster c of image b and head j the
    submatrix ``bias[b, j][rows[b, j, c]][:, keys[b, j, c]]``.

    One gather from the bias's flat storage (functional ops only: the eager path and the exported graph share it);
    a broadcast dimension (batch 1, one head) indexes with step 0, so the bias is never expanded. Gradients reach
    the bias (BEiT's relative-position table learns during the fine-tune).
    """
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).contiguous()
    sb, sh, sq, sk = (st if size > 1 else 0 for st, size in zip(b4.stride(), b4.shape, strict=True))
    idx = rows.unsqueeze(-1) * sq + keys.unsqueeze(-2) * sk  # (B, heads, C, m, width)
    if sh:
        idx = idx + torch.arange(rows.shape[1], device=rows.device).view(1, -1, 1, 1, 1) * sh
    if sb:
        idx = idx + torch.arange(rows.shape[0], device=rows.device).view(-1, 1, 1, 1, 1) * sb
    return b4.reshape(-1).index_select(0, idx.reshape(-1)).reshape(idx.shape)


def _global_rows(bias: Tensor | None, g: int) -> Tensor | None:
    """The rows of the first ``g`` (global) queries of ``bias`` (broadcastable to (B, heads, N, N))."""
    if bias is None or bias.dim() < 2 or bias.shape[-2] == 1:
        return bias
    return bias[..., :g, :]


def clustered_attention(q: Tensor, k: Tensor, v: Tensor, cluster_size: int, overlap: int = 0, num_global: int = 0,
                        iters: int = DEFAULT_ITERS, temperature: float = DEFAULT_TEMPERATURE,
                        scale: float | None = None, dropout_p: float = 0.0, overhead: float = 0.0,
                        out: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Attention of every token to its own cluster (plus sibling overlap and global tokens).

    Args:
        q: (B, heads, N, d) queries; clustering runs on them, per image and head.
        k: (B, heads, N, d) keys (same tokens as the queries).
        v: (B, heads, N, dv) values.
        cluster_size: Largest number of tokens in a cluster (leaves are ``ceil(N' / 2^L)``).
        overlap: Tokens of the sibling cluster each cluster also attends to (BOAT: 20).
        num_global: Leading tokens (class/distillation) that attend to, and are attended by, every token.
        iters: Soft k-means steps per split.
        temperature: Soft-assignment sharpness.
        scale: Logit scale (default ``d ** -0.5``, as SDPA).
        dropout_p: Attention dropout (training only; the caller decides).
        overhead: MAC-equivalents per token, channel and level charged to the clustering's sorts and gathers
            when deciding whether it pays (never counted as MACs): on CPU those memory-bound ops cost far more
            than their few MACs, so with 0 the clustered path can be chosen where it is slower than dense.
        out: Optional contiguous (B, N, heads, dv) tensor to write the result into (no gradient), e.g. a
            :func:`workspace` buffer; the return value is then its (B, heads, N, dv) transposed view.
        bias: Optional float term added to the logits of every (query, key) pair, broadcastable to (B, heads, N, N)
            (SDPA's float ``attn_mask``: BEiT's relative position bias). Each cluster adds the entries of the pairs
            it scores (its query rows against its key rows, global tokens included; see :func:`_pair_bias`), the
            global tokens' rows add theirs in full, so every scored pair has the logit dense attention gives it.

    Returns:
        (B, heads, N, dv), in the input order (clustered: a transposed view of a contiguous (B, N, heads, dv)
        tensor). Exactly ``F.scaled_dot_product_attention(q, k, v)`` when the clustered path does not pay (e.g.
        ``cluster_size >= N``).
    """
    b, h, n, d = q.shape
    if k.shape[-2] != n or v.shape[-2] != n:
        raise ValueError(f"clustered_attention: queries, keys and values must be the same {n} tokens, "
                         f"got {k.shape[-2]} keys and {v.shape[-2]} values")
    g = num_global
    plan = plan_clusters(n - g, cluster_size, overlap)
    if bias is not None:
        bias = bias.to(q.dtype)  # SDPA takes a float mask in the queries' dtype (autocast, half precision)
    if not _pays(plan, g, h * d, iters, overhead):
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        return dense if out is None else out.copy_(dense.transpose(1, 2)).transpose(1, 2)
    if tracing():  # torch.export / ONNX (or forward_traceable in eager): the functional twin, see the end of this file
        res = traceable_clustered_attention(q, k, v, plan, g, iters, temperature, scale, dropout_p, bias)
        return res if out is None else out.copy_(res.transpose(1, 2)).transpose(1, 2)
    # The clustering leaves the queries in cluster order (in float32); with a gradient to carry, or in another
    # dtype, they are gathered again below.
    grad = torch.is_grad_enabled() and q.requires_grad
    perm, q_sorted = _cluster(q[:, :, g:], plan, iters, temperature,
                              sorted_queries=not grad and q.dtype == torch.float32)
    perm = perm.view(b, h, plan.padded)  # no gradient through it
    extra = plan.padded - plan.tokens
    # Rows of the full q, k, v: cluster order shifted past the global tokens; padding slots read token g (any
    # real row: padding keys are masked and padding queries' outputs dropped), so nothing is padded or copied.
    src = torch.where(perm < plan.tokens, perm + g, g) if extra else (perm + g if g else perm)

    c, m = plan.clusters, plan.leaf
    if not g and not extra and bias is None and q_sorted is not None and not (
            torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
        attn = _window_attention(q_sorted, k, v, src, plan, scale, dropout_p)
    else:
        cluster_rows = src.view(b, h, c, m)
        # Each cluster's key rows: the global tokens, its own tokens, its sibling's boundary tokens. Built on the
        # indices, so keys and values are gathered once into place (no float copies to concatenate afterwards).
        key_rows = [cluster_rows, _sibling(cluster_rows.unsqueeze(-1), plan).squeeze(-1)]
        if g:
            key_rows.insert(0, torch.arange(g, device=q.device).expand(b, h, c, g))
        key_rows_t = torch.cat(key_rows, dim=3)  # (B, h, C, g + leaf + overlap)
        width = key_rows_t.shape[-1]
        # Keys and values gathered straight from their storage (usually the fused qkv projection, see _row_source):
        # no contiguous copy of k and v first.
        keys_t = key_rows_t.flatten(2)  # (B, h, C * keys)
        ks, kb, kstep = _row_source(k)
        vs, vb, vstep = _row_source(v)
        k_rows = _row_index(kb, kstep, keys_t).reshape(-1)
        v_rows = _row_index(vb, vstep, keys_t).reshape(-1)
        if grad or (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
            kk, vv = ks.index_select(0, k_rows), vs.index_select(0, v_rows)
        else:  # temporaries only SDPA reads: reused buffers (see workspace)
            kk = torch.index_select(ks, 0, k_rows, out=workspace("keys", (k_rows.numel(), d), k))
            vv = torch.index_select(vs, 0, v_rows, out=workspace("values", (v_rows.numel(), v.shape[-1]), v))
        kk, vv = kk.view(b, h * c, width, d), vv.view(b, h * c, width, -1)
        if q_sorted is not None:
            qc = q_sorted  # (B * h * Np, d); padding rows are zero queries whose outputs are dropped
        else:
            qs, qb, qstep = _row_source(q)
            qc = qs.index_select(0, _row_index(qb, qstep, src).reshape(-1))
        mask = None if bias is None else _pair_bias(bias, cluster_rows, key_rows_t).flatten(1, 2)
        if extra:
            real = (perm < plan.tokens).view(b, h, c, m, 1)
            valid = torch.cat([real, _sibling(real, plan)], dim=3).squeeze(-1)
            if g:
                valid = torch.cat([valid.new_ones(b, h, c, g), valid], dim=3)
            # Finite, not -inf: a cluster made only of padding must give finite (discarded) outputs and gradients.
            pad = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~valid, torch.finfo(q.dtype).min / 2).flatten(1, 2).unsqueeze(2)
            mask = pad if mask is None else mask + pad
        attn = F.scaled_dot_product_attention(qc.view(b, h * c, m, d), kk, vv, attn_mask=mask,
                                              dropout_p=dropout_p, scale=scale)  # (B, h*C, leaf, dv)
    # Back to the input order with one gather that also lays the heads out as (B, N, h, dv): callers merge heads
    # with ``out.transpose(1, 2).reshape(B, N, h * dv)``, which is then a view instead of another copy.
    dv = attn.shape[-1]
    if extra:
        inv = inverse_permutation(perm)[..., :plan.tokens]  # (B, h, N'): each token's position in cluster order
        rows = (torch.arange(b * h, device=q.device).view(b, h, 1) * plan.padded + inv).transpose(1, 2)
    else:  # the same rows, scattered straight into the (B, N', h) layout: output row of each position's token
        dest = torch.add(_grid(b, h, plan.tokens * h, 1, 0, q.device).unsqueeze(-1), perm, alpha=h)
        slots = _arange(dest.numel(), q.device)
        rows = torch.empty_like(slots).scatter_(0, dest.view(-1), slots)
    flat = attn.reshape(-1, dv)
    if g:
        out_g = F.scaled_dot_product_attention(q[:, :, :g], k, v, attn_mask=_global_rows(bias, g),
                                               dropout_p=dropout_p, scale=scale)
        res = torch.cat([out_g.transpose(1, 2), flat.index_select(0, rows.reshape(-1)).view(b, plan.tokens, h, dv)],
                        dim=1)
        return res.transpose(1, 2) if out is None else out.copy_(res).transpose(1, 2)
    if out is None:
        return flat.index_select(0, rows.reshape(-1)).view(b, n, h, dv).transpose(1, 2)
    torch.index_select(flat, 0, rows.reshape(-1), out=out.view(b * n * h, dv))
    return out.transpose(1, 2)


# --- the traceable twin (torch.export, ONNX) ---------------------------------------------------------------------
#
# The eager path above is built for CPU speed: numpy sorts packed keys, temporaries live in reused workspace buffers,
# outputs are written with out=, rows are read straight from the qkv projection's storage (as_strided) and index
# constants are lru-cached tensors. None of that is traceable: torch.export cannot see into numpy, and cached tensors
# or buffers created at trace time would be baked into the graph at the example's batch size. The functions below
# compute the same permutation and attention with functional torch ops only (batch size symbolic, every constant
# built by a torch op inside the graph), in float32 as the eager clustering. clustered_attention takes them while
# torch.compiler.is_exporting() or inside traceable_path(), so the eager fast path is untouched.


_TRACEABLE = threading.local()


@contextlib.contextmanager
def traceable_path() -> Iterator[None]:
    """Inside this context :func:`clustered_attention` runs its functional twin in eager mode too, so a model's
    ``forward_traceable`` computes in eager exactly what its exported graph runs (the conformance suite compares the
    two). This thread only; nests."""
    before = getattr(_TRACEABLE, "on", False)
    _TRACEABLE.on = True
    try:
        yield
    finally:
        _TRACEABLE.on = before


def tracing() -> bool:
    """Whether clustering code must take its traceable twin: while ``torch.export`` traces (ONNX export included),
    while ``torch.compile`` does (the eager path's numpy sort, reused buffers and slices of the batch would break the
    graph or guard on the batch size), or inside :func:`traceable_path`."""
    return graph_tracing() or getattr(_TRACEABLE, "on", False)


def traceable_clusters(q: Tensor, plan: ClusterPlan, iters: int = DEFAULT_ITERS,
                       temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """:func:`balanced_clusters` of q (B, h, N, d) as (B * h, padded) token indices, with functional ops only.

    The same arithmetic as :func:`_cluster_fp32`, op for op (so on CPU in eager mode the same float32 values of
    ``r``), and the same order: the eager sort is the stable ascending order of ``r`` by slot (packed keys), which is
    ``torch.argsort(r, stable=True)`` on the float values (``r >= +0``, padding ``+inf``); the ONNX exporter turns it
    into ``TopK(k = size, largest = 0)``, whose ties break by lower index, i.e. stably as well.
    """
    n, d = q.shape[-2:]
    np_ = plan.padded
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        x = q.detach().to(torch.float32).reshape(-1, n, d)  # (rows, n, d); rows = B * h, symbolic in an export
        if np_ > n:  # padding tokens are zero vectors: they add nothing to any centroid
            x = F.pad(x, (0, 0, 0, np_ - n))
        inv = torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12).reciprocal()  # (rows, np_)
        tokens = torch.arange(np_, device=q.device).expand(x.shape[0], np_)  # token at each position
        # Each row carries its inverse norm, padding flag and token number as three more columns (float32: exact for
        # token numbers below 2**24), so that one gather moves them all and each level reads them from the table the
        # level before stored. As separate gathers, chained level after level, inductor inlined them into one
        # another: index expressions as deep as the hierarchy, which its C++ code generation simplified with sympy
        # for minutes (FSLA on Swin-T had not compiled after 15 minutes).
        table = torch.cat([x, inv.unsqueeze(-1), (tokens >= n).to(x.dtype).unsqueeze(-1),
                           tokens.to(x.dtype).unsqueeze(-1)], dim=-1)
        for level in range(plan.levels):
            table = _split_level(table, d, np_ >> level, iters, temperature)
    return table[..., d + 2].long()


def _split_level(table: Tensor, d: int, size: int, iters: int, temperature: float) -> Tensor:
    """One level of :func:`traceable_clusters`: every group of ``size`` positions split in two halves; ``table``
    (rows, padded, d + 3): each position's features, then its inverse norm, padding flag and token number, reordered
    as one table."""
    np_ = table.shape[1]
    half = size // 2
    tg = table.reshape(-1, size, d + 3)  # (rows x groups, size, d + 3)
    xg = tg[..., :d].contiguous()  # the layout the eager clustering's matmuls read (the same float32 results)
    xt = xg.transpose(1, 2)
    inv_g = tg[..., d].reshape(-1, 1, size)
    c = _normalized_f(xg.reshape(-1, 2, half, d).sum(2))
    for _ in range(iters):
        dc = (c[:, :1] - c[:, 1:]) * temperature
        a0 = torch.sigmoid(torch.bmm(dc, xt) * inv_g)
        c = _normalized_f(torch.bmm(torch.cat([a0, 1.0 - a0], dim=1), xg))
    s = torch.bmm(c, xt) * inv_g + 1.0
    # The eager floors (0 and 1e-6 as one (1, 2, 1) tensor), as two clamps with the same float32 bounds.
    r = s[:, 0].clamp_min(0.0) / s[:, 1].clamp_min(1e-6)  # (rows x groups, size)
    r = torch.where(tg[..., d + 1] > 0, torch.full_like(r, float("inf")), r)
    idx = torch.argsort(r, dim=-1, stable=True)  # positions inside each group, in the new order
    return gather_rows(tg, idx).reshape(-1, np_, d + 3)


def gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``t`` (..., N, D) at ``idx`` (..., M), per leading index: (..., M, D), the value of ``torch.gather(t,
    -2, idx.unsqueeze(-1).expand(..., D))``.

    As one 1-D row gather on the flattened table (``index_select``; in ONNX one ``Gather``), not ``torch.gather`` on
    indices expanded over the channels, which the exporter writes as ``Expand`` + ``GatherElements``: an index per
    channel, built and read for every row (in FSLA on Swin-T, 0.15 of the base graph's whole kernel time)."""
    n, d = t.shape[-2:]
    m = idx.shape[-1]
    lead = idx.reshape(-1, m)
    offsets = torch.arange(lead.shape[0], device=idx.device).unsqueeze(1) * n
    return t.reshape(-1, d).index_select(0, (lead + offsets).reshape(-1)).reshape(*idx.shape, d)


def _normalized_f(c: Tensor) -> Tensor:
    """:func:`_normalized` out of place (the same values)."""
    return c / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(1e-12)


def traceable_clustered_attention(q: Tensor, k: Tensor, v: Tensor, plan: ClusterPlan, num_global: int = 0,
                                  iters: int = DEFAULT_ITERS, temperature: float = DEFAULT_TEMPERATURE,
                                  scale: float | None = None, dropout_p: float = 0.0,
                                  bias: Tensor | None = None) -> Tensor:
    """The clustered branch of :func:`clustered_attention` (``plan`` for the ``N - num_global`` clustered tokens)
    with functional ops only: (B, heads, N, dv) in the input order; ``bias`` as there (in the queries' dtype).

    Keys and values are gathered per cluster in the order the eager path uses (its window path's when there are no
    global tokens and no padding: sibling rows first for odd clusters), so in eager mode the two agree to float
    rounding of the softmax at most.
    """
    b, h, _, d = q.shape
    g, c, m, o = num_global, plan.clusters, plan.leaf, plan.overlap
    dv = v.shape[-1]
    perm = traceable_clusters(q[:, :, g:], plan, iters, temperature).reshape(b, h, plan.padded)
    extra = plan.padded > plan.tokens
    # Rows of q, k, v at each position: padding positions read token g (masked as keys, their outputs dropped).
    src = torch.where(perm < plan.tokens, perm + g, torch.full_like(perm, g)) if extra else perm + g
    # Positions (in cluster order) of each cluster's keys: its own, then its sibling's boundary tokens; built by
    # torch ops in the graph, not baked from the example.
    own = torch.arange(plan.padded, device=q.device).reshape(c, m)
    sib = _sibling(own.unsqueeze(-1), plan).squeeze(-1)  # (C, overlap)
    if not g and not extra and o and bias is None:  # the eager window path's order: odd clusters' sibling rows first
        odd = (torch.arange(c, device=q.device) % 2 == 1).unsqueeze(-1)
        key_pos = torch.where(odd, torch.cat([sib, own], dim=1), torch.cat([own, sib], dim=1))
    else:
        key_pos = torch.cat([own, sib], dim=1)  # (C, leaf + overlap)
    keys = src[..., key_pos.reshape(-1)].reshape(b, h, c, m + o)
    if g:
        keys = torch.cat([torch.arange(g, device=q.device).expand(b, h, c, g), keys], dim=3)
    width = keys.shape[-1]
    flat_keys = keys.reshape(b, h, c * width)
    kk = gather_rows(k, flat_keys).reshape(b, h * c, width, d)
    vv = gather_rows(v, flat_keys).reshape(b, h * c, width, dv)
    qc = gather_rows(q, src).reshape(b, h * c, m, d)
    mask = None if bias is None else _pair_bias(bias, src.reshape(b, h, c, m), keys).reshape(b, h * c, m, width)
    if extra:
        valid = (perm < plan.tokens)[..., key_pos.reshape(-1)].reshape(b, h, c, m + o)
        if g:
            valid = torch.cat([torch.ones_like(valid[..., :1]).expand(b, h, c, g), valid], dim=3)
        # Finite, not -inf, as the eager path: a cluster made only of padding gives finite (discarded) outputs.
        pad = torch.zeros_like(valid, dtype=q.dtype).masked_fill(~valid, torch.finfo(q.dtype).min / 2)
        pad = pad.reshape(b, h * c, 1, width)
        mask = pad if mask is None else mask + pad
    attn = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    attn = attn.reshape(b, h, plan.padded, dv)
    # Back to the input order: each token's position in cluster order is the inverse permutation.
    positions = torch.arange(plan.padded, device=q.device).expand(b, h, plan.padded)
    inv = torch.zeros_like(perm).scatter(-1, perm, positions)[..., :plan.tokens]
    res = gather_rows(attn, inv)
    if g:
        out_g = F.scaled_dot_product_attention(q[:, :, :g], k, v, attn_mask=_global_rows(bias, g), dropout_p=dropout_p,
                                               scale=scale)
        res = torch.cat([out_g, res], dim=2)
    return res
