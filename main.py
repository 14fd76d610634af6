"""Train and evaluate with LightningCLI: `python main.py {fit,validate,test} --config configs/X.yaml`.

The YAML holds every choice: `model` (CLIPModule and its two towers), `data` (a LightningDataModule),
and `trainer` (devices, precision, callbacks such as the zero-shot benchmarks).
"""

from rwkv_clip.cli import main

if __name__ == "__main__":
    main()
