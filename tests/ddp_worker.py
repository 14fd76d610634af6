"""Run by tests/test_module.py: one training step of CLIPModule under 2-process CPU DDP (gloo).

Rank r trains on rows [r·B, (r+1)·B) of a fixed batch, so the gathered batch is the concatenated one. Rank 0
writes the per-rank losses and the DDP-reduced gradients to the output file for comparison with one process.
Optional arguments: CLIPModule's micro_batch_size (chunked encoding with cached features) and the number of
steps (the losses and gradients written are the last step's).
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from rwkv_clip.module import CLIPModule
from tiny_towers import TinyImageTower, TinyTextTower, fixed_batch

LOCAL_BATCH = 4


class GradCapture(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


class HalfBatchModule(CLIPModule):
    def train_dataloader(self):
        images, tokens = fixed_batch(2 * LOCAL_BATCH)
        rows = slice(self.global_rank * LOCAL_BATCH, (self.global_rank + 1) * LOCAL_BATCH)
        return DataLoader(TensorDataset(images[rows], tokens[rows]), batch_size=LOCAL_BATCH)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.rank_losses = self.all_gather(loss.detach())
        return loss


def main(out_path: str, loss: str, micro_batch_size: str = "none", steps: str = "1") -> None:
    torch.manual_seed(0)
    micro = None if micro_batch_size == "none" else int(micro_batch_size)
    model = HalfBatchModule(TinyImageTower(), TinyTextTower(), embed_dim=8, loss=loss, micro_batch_size=micro)
    capture = GradCapture()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=int(steps), use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[capture],
    )
    trainer.fit(model)
    if trainer.global_rank == 0:
        torch.save({"rank_losses": model.rank_losses, "grads": capture.grads}, out_path)
    torch.distributed.destroy_process_group()  # as main.py does: gloo's threads torn down at exit can abort


if __name__ == "__main__":
    main(*sys.argv[1:])
