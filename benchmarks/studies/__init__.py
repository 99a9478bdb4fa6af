"""One-off studies: investigations behind design decisions, kept runnable but not part of the suite.

``python -m benchmarks`` never runs them. Each writes its result next to the suite's in ``benchmarks/results/``;
those files are a dated record of the investigation (the README quotes some), not numbers the suite regenerates.
Studies import the package, :mod:`benchmarks.common` (and the CIFAR-10 data helpers :mod:`benchmarks.cifar10`) and
each other, never a suite benchmark; the suite never imports a study.

==========================  ===================================================================================
``cifar10_points``          top-1 of a fine-tuned model at chosen points (``cifar10_fsla_replace_points.json``)
``dge_blocks``              PVT-v2 DGE block by block, each path (``dge_blocks_t1.json``)
``dge_hooks``               per-block timing hooks for the DGE studies (a helper, no results)
``exit_scores``             DVT exits routed by other scores of the same logits (``checks/*/exit_scores.json``)
``fit_execution``           fits DGE's execution cost constants (``execution_fit_t2.json``)
``fsla_zero_shot``          FSLA replace without fine-tuning on CIFAR-10 (``fsla_cifar10_zero_shot.json``)
``profile_dge``             torch.profiler op tables of DGE (``dge_profile.{json,md}``)
``profile_fsla``            where FSLA's added time goes in Swin-T (``fsla_profile.{json,md}``)
``small_batch_overhead``    what the small-batch rule costs at batch 1 (``small_batch_overhead.json``)
==========================  ===================================================================================

Run one with ``python -m benchmarks.studies.<name> --help``.
"""
