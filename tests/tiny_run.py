"""Real `main.py` runs of a tiny RWKV-CLIP on tiny demo data, for the end-to-end tests (resume, DDP), and the
callbacks those runs load from their YAML (this folder is on their PYTHONPATH)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Generation settings of the tiny demo data; DemoDataModule regenerates data made with other ones.
TINY_DATA = dict(num_test_per_class=1, shapes=["circle", "square"], colours=["red", "blue"], vocab_size=300,
                 image_size=16)


def tiny_config(data_root: Path, num_train: int, num_val: int, num_workers: int = 0, batch_size: int = 4,
                max_epochs: int = 1, callbacks: list | None = None, **trainer) -> dict:
    """A 0.05M-parameter RWKV-CLIP (with drop path, so the model draws random numbers) on the demo data."""
    data = {k: v for k, v in TINY_DATA.items() if k != "image_size"}
    return {
        "seed_everything": 0,
        "model": {"class_path": "rwkv_clip.module.CLIPModule", "init_args": {
            "image_encoder": {"class_path": "rwkv_clip.backbones.VisionRWKV", "init_args": {
                "img_size": 16, "patch_size": 4, "width": 32, "depth": 2, "head_size": 16, "mlp_ratio": 2.0,
                "drop_path_rate": 0.2, "wkv_backend": "reference"}},
            "text_encoder": {"class_path": "rwkv_clip.backbones.TextRWKV", "init_args": {
                "vocab_size": 300, "context_length": 12, "width": 32, "depth": 1, "head_size": 16,
                "ffn_hidden": 64, "wkv_backend": "reference"}},
            "lr": 3e-3, "warmup": 0.1}},
        "data": {"class_path": "rwkv_clip.datamodules.DemoDataModule", "init_args": {
            "root": str(data_root), "num_train": num_train, "num_val": num_val, "data_image_size": 16, **data,
            "image_size": 16, "context_length": 12, "batch_size": batch_size, "num_workers": num_workers,
            "torch_threads": 1}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks or [],
                    **trainer},
    }


def run_main(subcommand: str, config: dict, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python main.py SUBCOMMAND --config CONFIG ARGS`` in its own process group, killed whole (DDP ranks
    included) when it runs past ``timeout``, which then fails the test instead of hanging it."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), subcommand, "--config", "config.yaml", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"main.py {subcommand} still ran after {timeout} s (a hang?)\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class BatchDigest(L.Callback):
    """Appends one JSON line per training step: the step, epoch, batch index and a digest of the batch as the
    model sees it (augmented images and token ids), so two runs can be compared step by step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, tokens = batch
        digest = hashlib.sha1(images.detach().cpu().numpy().tobytes() + tokens.cpu().numpy().tobytes()).hexdigest()
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step + 1, "epoch": trainer.current_epoch,
                                "batch_idx": batch_idx, "size": len(tokens), "digest": digest}) + "\n")


class KillAtStep(L.Callback):
    """SIGKILLs the process (no clean-up, like a crash or an OOM kill) at the end of training step ``step``,
    before that step's own checkpoint could be written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalState(L.Callback):
    """Saves every tensor of the model and the optimizer when training ends."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save({"model": pl_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                        "global_step": trainer.global_step}, self.path)


class CountValBatches(L.Callback):
    """Writes ``{rank: number of validation batches}`` of the last validation epoch, and the logged val/loss."""

    def __init__(self, path: str):
        self.path, self.count = path, 0

    def on_validation_epoch_start(self, trainer, pl_module):
        self.count = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.count += 1

    def on_validation_epoch_end(self, trainer, pl_module):
        counts = pl_module.all_gather(torch.tensor(self.count)).tolist()
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            loss = trainer.callback_metrics.get("val/loss")
            with open(self.path, "w") as f:
                json.dump({"batches_per_rank": counts, "val_loss": None if loss is None else float(loss)}, f)
