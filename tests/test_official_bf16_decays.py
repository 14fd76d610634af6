"""Why our text decays train in float32: the official code's bfloat16 ``time_decay`` cannot move under AdamW.

The official text tower creates ``time_decay`` (and ``time_faaaa``) as bfloat16 parameters and never casts them.
An AdamW step moves a parameter by about lr (1e-3 at the peak), but a bfloat16 number of magnitude 1 to 6 (every
decay logit, -6..-1 at init) is only representable in steps of 2^-7 to 2^-5, so the update rounds away every time.
This simulates the published recipe on the B/32 text tower's decays: run with ``pytest -s`` to see the figures.
"""

import torch

from rwkv_clip.backbones.rwkv import SpatialMix

WIDTH, DEPTH, HEAD_SIZE, STEPS = 640, 6, 64, 2000  # the published text tower; 2000 steps of the recipe


def published_recipe_run(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The decays at init and after STEPS steps of AdamW(lr 1e-3, betas (0.9, 0.98), wd 0.2 on everything as the
    official code does), OneCycleLR(pct_start 0.1), with gradients that have a steady part and noise."""
    init = torch.cat([SpatialMix(WIDTH, HEAD_SIZE, layer, DEPTH, 64e-5, "reference").time_decay.detach().flatten()
                      for layer in range(DEPTH)])
    param = torch.nn.Parameter(init.to(dtype))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    steady = torch.randn(init.shape, generator=g) * 0.5
    for _ in range(STEPS):
        param.grad = (steady + torch.randn(init.shape, generator=g)).to(dtype)
        optimizer.step()
        schedule.step()
    return init, param.detach().float()


def test_bf16_decays_stay_at_their_initial_values_while_fp32_decays_train():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: a second thread only waits
    try:
        init, bf16 = published_recipe_run(torch.bfloat16)
        _, fp32 = published_recipe_run(torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert init.abs().min() >= 1.0  # every decay logit lies in [-6, -1]
    moved_bf16 = (bf16 != init.bfloat16().float()).sum().item()
    moved_fp32 = (fp32 != init).sum().item()
    largest_fp32 = (fp32 - init).abs().max().item()
    print(f"\n{STEPS} AdamW steps at lr 1e-3 on {init.numel()} text decays: bf16 parameters moved {moved_bf16}, "
          f"fp32 parameters moved {moved_fp32} (largest change {largest_fp32:.2f})")
    assert moved_bf16 == 0
    assert moved_fp32 == init.numel() and largest_fp32 > 0.1
