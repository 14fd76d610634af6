"""Two-process DDP (CPU, gloo) through `main.py` on data that does not split evenly: it finishes, or is refused at
start-up with a message, and never hangs (each run has a timeout; a hang fails the test)."""

import json
from pathlib import Path

import pytest

from rwkv_clip.datamodules import ensure_demo_data
from tiny_run import TINY_DATA, run_main, tiny_config

NUM_TRAIN, NUM_VAL = 37, 9  # odd: with batches of 4 on 2 ranks, neither splits evenly
DDP = dict(devices=2, strategy="ddp")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    ensure_demo_data(str(root), num_train=NUM_TRAIN, num_val=NUM_VAL, **TINY_DATA)
    return root


def test_odd_train_and_validation_sets_train_and_validate(tmp_path, data_root):
    """Training drops the odd samples (drop_last: true, the default), so both ranks take 4 steps; validation reads
    every sample, so the ranks hold 1 and 2 batches: validation_step must not call a collective per batch."""
    callbacks = [{"class_path": "tiny_run.CountValBatches", "init_args": {"path": str(tmp_path / "val.json")}}]
    config = tiny_config(data_root, NUM_TRAIN, NUM_VAL, max_epochs=1, callbacks=callbacks, **DDP)
    proc = run_main("fit", config, cwd=tmp_path, timeout=420)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "`Trainer.fit` stopped" in proc.stderr + proc.stdout
    val = json.loads((tmp_path / "val.json").read_text())
    assert sorted(val["batches_per_rank"]) == [1, 2]
    assert val["val_loss"] is not None and val["val_loss"] > 0


def test_uneven_training_split_is_refused_at_start_up(tmp_path, data_root):
    config = tiny_config(data_root, NUM_TRAIN, NUM_VAL, max_epochs=1, **DDP)
    config["data"]["init_args"]["drop_last"] = False
    proc = run_main("fit", config, cwd=tmp_path, timeout=420)
    assert proc.returncode != 0
    assert "splits unevenly over 2 devices" in proc.stderr and "drop_last: true" in proc.stderr, proc.stderr[-4000:]
