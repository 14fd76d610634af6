"""Small helpers shared by the towers."""

import torch


def padding_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """True at real tokens of right-padded ``tokens`` (B, L).

    A position is real when it lies at or before the last non-pad token, so a token whose id happens
    to equal ``pad_id`` inside the text (CLIP's BPE has no dedicated pad token: id 0 is "!") stays real.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    lengths = ((tokens != pad_id) * positions).amax(dim=1, keepdim=True)
    return positions <= lengths
