"""End to end: a `main.py fit` run SIGKILLed mid-epoch and resumed with `--ckpt_path` matches the uninterrupted run.

Each run records a digest of every batch it trains on (augmented images and token ids) and saves every model and
optimizer tensor at the end. The resumed run must train on exactly the batches the uninterrupted run trained on
after the checkpoint, and end with bitwise-equal tensors (CPU), with 0 and 2 loader workers. The model has drop
path, so the global random state must come back too.
"""

import json
from pathlib import Path

import pytest
import torch

from rwkv_clip.datamodules import ensure_demo_data
from tiny_run import TINY_DATA, run_main, tiny_config

NUM_TRAIN, NUM_VAL = 36, 9
STEPS_PER_EPOCH = 9  # batches of 4
EPOCHS = 2
KILL_AT = 5  # in epoch 0; checkpoints every 3 steps, so last.ckpt is step 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    ensure_demo_data(str(root), num_train=NUM_TRAIN, num_val=NUM_VAL, **TINY_DATA)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """Runs by (name, num_workers), each made once: "full" (uninterrupted), "killed" (SIGKILLed at KILL_AT), and
    runs resumed from a checkpoint."""
    root, made = tmp_path_factory.mktemp("resume_runs"), {}

    def get(name: str, num_workers: int, ckpt: Path | None = None) -> Path:
        if (name, num_workers) not in made:
            made[name, num_workers] = train(root / f"{name}_{num_workers}", data_root, num_workers,
                                            kill_at=KILL_AT if name == "killed" else None, ckpt=ckpt)
        return made[name, num_workers]

    return get


def train(run_dir: Path, data_root: Path, num_workers: int, kill_at: int | None = None,
          ckpt: Path | None = None) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(run_dir / "checkpoints"), "save_last": True, "every_n_train_steps": 3, "save_top_k": -1}},
        {"class_path": "tiny_run.BatchDigest", "init_args": {"path": str(run_dir / "batches.jsonl")}},
        {"class_path": "tiny_run.SaveFinalState", "init_args": {"path": str(run_dir / "final.pt")}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "tiny_run.KillAtStep", "init_args": {"step": kill_at}})
    config = tiny_config(data_root, NUM_TRAIN, NUM_VAL, num_workers, max_epochs=EPOCHS, callbacks=callbacks)
    proc = run_main("fit", config, *(["--ckpt_path", str(ckpt)] if ckpt else []), cwd=run_dir)
    if kill_at is not None:
        assert proc.returncode == -9, f"expected a SIGKILL, got {proc.returncode}\n{proc.stderr[-4000:]}"
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return run_dir


def digests(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


def assert_resumed_like_full(full: Path, resumed: Path, ckpt_step: int) -> None:
    expected = [d for d in digests(full) if d["step"] > ckpt_step]
    seen = digests(resumed)
    assert [d["step"] for d in seen] == [d["step"] for d in expected]
    wrong = [d["step"] for d, e in zip(seen, expected) if d != e]
    assert not wrong, f"steps that trained on other samples, texts or augmentations than without the kill: {wrong}"
    # Every epoch after the resumed one is whole (a loader left in its resume state once ended the next epoch
    # after one batch, or none).
    for epoch in range(seen[0]["epoch"] + 1, EPOCHS):
        assert sum(d["epoch"] == epoch for d in seen) == STEPS_PER_EPOCH

    a, b = torch.load(full / "final.pt", weights_only=True), torch.load(resumed / "final.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} of {len(a['model'])} model tensors differ from the full run: {differ[:5]}"
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_from_last_ckpt_is_exact(runs, num_workers):
    full, killed = runs("full", num_workers), runs("killed", num_workers)
    assert not (killed / "final.pt").exists()
    last = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and saved["epoch"] == 0
    assert digests(killed) == digests(full)[:KILL_AT]  # before the kill it trained like the uninterrupted run

    resumed = runs("resumed", num_workers, ckpt=last)
    assert_resumed_like_full(full, resumed, ckpt_step=3)


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch_is_exact(runs):
    """Step 9 is the last batch of epoch 0: validation and the next epoch's loader start between it and step 10."""
    full = runs("full", 0)
    resumed = runs("resumed_at_epoch_end", 0, ckpt=full / "checkpoints" / "epoch=0-step=9.ckpt")
    assert_resumed_like_full(full, resumed, ckpt_step=9)
