"""The fine-tune's loss, shared by every method: distillation from the original model, labels, the method's terms.

``loss_terms`` gives the unweighted terms, ``loss_weight`` the recipe's weight of each (``finetune.losses``; 1.0
when a term has none):

* ``distill``: KL divergence from the original (teacher) model's softened outputs to the converted model's, times
  ``T**2`` (``finetune.distill_temperature``);
* ``ce``: cross-entropy with the labels (``finetune.label_smoothing``), when labels are used;
* both also at every earlier exit a method exposes (``exit.<name>`` outputs of ``forward_train``: ``distill@<name>``,
  ``ce@<name>``), weighted like their kind;
* the method's own terms from ``model.method_losses`` (e.g. CF-ViT's coarse-to-fine KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitconvert.methods.base import ConvertedModel
from vitconvert.recipes import FinetuneSettings

EXIT_PREFIX = "exit."


def loss_terms(model: ConvertedModel, outputs: dict[str, torch.Tensor], teacher_logits: torch.Tensor | None,
               labels: torch.Tensor | None, settings: FinetuneSettings) -> dict[str, torch.Tensor]:
    """The unweighted loss terms: distill (when a teacher runs), ce (with labels) and the method's own.

    ``distill`` and ``ce`` apply to the final ``logits`` and to every earlier exit the method exposes
    (``exit.<name>`` outputs, e.g. each member of a cascade): ``distill@<name>`` and ``ce@<name>``, weighted
    like ``distill`` and ``ce``.
    """
    exits = {"": outputs["logits"]}
    exits.update({k[len(EXIT_PREFIX):]: v for k, v in outputs.items() if k.startswith(EXIT_PREFIX)})
    terms: dict[str, torch.Tensor] = {}
    t = settings.distill_temperature
    target = F.log_softmax(teacher_logits.float() / t, dim=-1) if teacher_logits is not None else None
    for name, exit_logits in exits.items():
        suffix = f"@{name}" if name else ""
        logits = exit_logits.float()
        if target is not None:
            student = F.log_softmax(logits / t, dim=-1)
            terms["distill" + suffix] = F.kl_div(student, target, reduction="batchmean", log_target=True) * (t * t)
        if labels is not None:
            terms["ce" + suffix] = F.cross_entropy(logits, labels, label_smoothing=settings.label_smoothing)
    for name, value in model.method_losses(outputs, labels, teacher_logits).items():
        if name in terms:
            raise RuntimeError(f"{model.method}.method_losses returned {name!r}, which the shared loss already has")
        terms[name] = value
    return terms


def loss_weight(weights: dict[str, float], term: str) -> float:
    """The recipe's weight of a loss term; an exit's term (``distill@coarse``) is weighted like its kind."""
    return weights.get(term.split("@", 1)[0], 1.0)
