"""Reusable pieces the methods are built from; each module knows no method.

* :mod:`~vitconvert.layers.costs`: the MAC rules and units every GMACs figure is made of;
* :mod:`~vitconvert.layers.cascade`: early-exit cascades (real sub-batching, per-image cost, simulation);
* :mod:`~vitconvert.layers.empty_batches`: timm's blocks on a sub-batch that may hold no image (a cascade's later
  stages in an exported graph);
* :mod:`~vitconvert.layers.regions`, :mod:`~vitconvert.layers.ragged`: region layouts of token grids and
  execution of a ragged subset of queries;
* :mod:`~vitconvert.layers.scale_conv`: PVT-v2's depthwise convolution at each query's own scale;
* :mod:`~vitconvert.layers.reuse`: reuse between the members of a multi-resolution cascade (token-grid and
  attention-logit resizes, the feature-reuse branch, the relation mixer);
* :mod:`~vitconvert.layers.seams`: fx seams in timm blocks (attention logits and bias, inserted residual
  branches, the pre-norm residual block reader, drop-path slots, swapping the attention core);
* :mod:`~vitconvert.layers.clustering`: balanced hierarchical clustering of tokens and attention inside the
  clusters (BOAT's feature-space local attention), with its MAC count.
"""
