"""Train and evaluate with LightningCLI: `python main.py {fit,validate,test} --config configs/X.yaml`.

The YAML holds every choice: `model` (CLIPModule and its two towers), `data` (a LightningDataModule),
and `trainer` (devices, precision, callbacks such as the zero-shot benchmarks).
"""

import torch.distributed as dist

from rwkv_clip.cli import main

if __name__ == "__main__":
    try:
        main()
    finally:
        # Lightning leaves the process group up; tearing gloo's threads down at interpreter exit can abort
        # ("terminate called without an active exception") after a run that succeeded.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
