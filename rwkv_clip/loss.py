"""Contrastive losses on L2-normalised features (docs/training.md).

Both losses use the "local loss" form: each rank scores its own rows against the columns of every rank.
The caller gathers the other ranks' features *with gradient* (``LightningModule.all_gather(x, sync_grads=True)``),
so that, once DDP averages the parameter gradients over ranks, the gradient equals that of one process
computing the loss on the concatenated batch.
"""

import math

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE: ``(CE(s·I·Tᵀ, labels) + CE(s·T·Iᵀ, labels)) / 2`` for this rank's rows.

    ``image_features``/``text_features`` are this rank's (B, D); ``all_*`` are every rank's, concatenated
    (W·B, D). The labels are offset by ``rank·B``: row i of this rank matches column ``rank·B + i``.
    """
    scale = logit_scale.exp()
    logits_per_image = scale * image_features @ all_text_features.T
    logits_per_text = scale * text_features @ all_image_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    rank: int = 0,
) -> torch.Tensor:
    """Sigmoid loss ``-Σ_j log σ(z_ij·(s·⟨I_i, T_j⟩ + b))``, averaged over this rank's images.

    z is +1 on the diagonal (column ``rank·B + i`` for row i) and −1 elsewhere. The normalisation (sum over
    texts, mean over images) is the SigLIP paper's, so the loss does not shrink as the batch grows.
    """
    logits = logit_scale.exp() * image_features @ all_text_features.T + logit_bias
    local_batch = image_features.shape[0]
    targets = -torch.ones_like(logits)
    rows = torch.arange(local_batch, device=logits.device)
    targets[rows, rows + rank * local_batch] = 1.0
    return -F.logsigmoid(targets * logits).sum(dim=1).mean()


CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0
