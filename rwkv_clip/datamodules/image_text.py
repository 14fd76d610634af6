"""Streaming image-text data: LitData chunks -> ``(images, tokens)`` batches.

Each sample of a prepared directory (``python -m rwkv_clip.datamodules.prepare``) holds a JPEG and up to three
texts (``text``, ``synthetic_caption``, ``generated_caption``; a missing one is ""). Every time a sample is read,
one of the enabled texts is drawn with the configured weights (the RWKV-CLIP "diverse descriptions", docs/training.md).

YAML (LightningCLI):

    data:
      class_path: rwkv_clip.datamodules.ImageTextDataModule
      init_args:
        train_dir: data/my_set/train
        val_dir: data/my_set/val
        tokenizer: data/bpe_simple_vocab_16e6.txt.gz     # or a tokenizer.json
        image_size: 224
        batch_size: 256
        num_workers: 8
        text_sources: [text, synthetic_caption, generated_caption]
        weights: null                                    # uniform
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from litdata import StreamingDataLoader, StreamingDataset
from PIL import Image
from torchvision import transforms as T

from rwkv_clip.schema import (CLIP_MEAN, CLIP_STD, TEXT_FIELDS, check_data_format, check_prepared_dir, index_fields,
                              read_index)
from rwkv_clip.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                   "nearest": T.InterpolationMode.NEAREST}
_REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "hf://", "http://", "https://", "local:")


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(image_size: int, scale: Sequence[float] = (0.7, 1.0), ratio: Sequence[float] = (0.8, 1.25),
                    hflip: float = 0.5, interpolation: str = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """The published augmentation (docs/training.md): RandomResizedCrop(area 0.7-1, ratio 0.8-1.25), horizontal flip, CLIP normalisation."""
    steps: list[Callable] = [_to_rgb, T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio),
                                                          interpolation=_INTERPOLATIONS[interpolation], antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def eval_transform(image_size: int, interpolation: str = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shortest side to ``image_size``, centre crop, CLIP normalisation (the CLIP eval preprocessing)."""
    return T.Compose([_to_rgb, T.Resize(image_size, interpolation=_INTERPOLATIONS[interpolation], antialias=True),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def choose_text(sample: dict[str, Any], sources: Sequence[str], weights: Sequence[float], rng: random.Random) -> str:
    """Draw one of ``sources`` with ``weights``, among those the sample has (non-empty). "" if it has none."""
    present = [(s, w) for s, w in zip(sources, weights)
               if w > 0 and isinstance(sample.get(s), str) and sample[s].strip()]
    if not present:
        return ""
    if len(present) == 1:
        return sample[present[0][0]]
    r = rng.random() * sum(w for _, w in present)
    for source, w in present:
        r -= w
        if r < 0:
            return sample[source]
    return sample[present[-1][0]]


class ImageTextDataset(StreamingDataset):
    """StreamingDataset that decodes, augments and tokenizes, so default collation gives ``(images, tokens)``.

    A sample whose image cannot be decoded is replaced by the last good sample of this worker (batches keep their
    size, which DDP's all-gather needs), counted in ``num_skipped`` and reported in a warning.

    Nothing stored in the data is run: litdata deserialises each field with the format recorded in
    ``index.json``, and "pickle" would execute code. The formats are checked against
    :data:`rwkv_clip.schema.SAFE_DATA_FORMATS` as soon as litdata has the index (fetched, for remote data), before
    any sample is read; ``fields`` lists the stored field names.
    """

    def __init__(self, input_dir: str, tokenizer: Tokenizer, image_transform: Callable[[Image.Image], torch.Tensor],
                 text_sources: Sequence[str] = TEXT_FIELDS, weights: Sequence[float] | None = None,
                 text_seed: int = 0, fixed_text: bool = False, **kwargs: Any) -> None:
        index_name = f"{str(input_dir).rstrip('/')}/index.json"
        try:
            super().__init__(input_dir, **kwargs)
        except json.JSONDecodeError as e:  # raised from inside litdata, which does not say which file
            raise ValueError(f"{index_name} is not valid JSON ({e}): the dataset's index is damaged; prepare the "
                             "dataset again, or restore index.json") from None
        # For remote data self.input_dir.path is litdata's local cache, where it has just fetched index.json.
        index = read_index(os.path.join(self.input_dir.path, "index.json"))
        check_data_format(index["config"], index_name)
        self.fields = index_fields(index["config"])
        self.num_samples = sum(end - start for start, end in self.region_of_interest)  # in all ranks together
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.text_sources = list(text_sources)
        self.text_weights = [1.0] * len(self.text_sources) if weights is None else [float(w) for w in weights]
        self.text_seed = int(text_seed)
        self.fixed_text = fixed_text  # validation: same text for a sample every epoch
        self.num_skipped = 0
        self._last_good: tuple[torch.Tensor, torch.Tensor] | None = None

    def _sample_rng(self, index: int) -> random.Random:
        # Every random choice for a sample (its crop, flip and text) is seeded by (seed, epoch, sample): different
        # each epoch, the same whichever loader worker reads it, and the same in a run resumed from a checkpoint.
        epoch = 0 if self.fixed_text else int(getattr(self, "current_epoch", 0))
        return random.Random((self.text_seed * 1_000_003 + epoch) * 2_147_483_647 + index)

    def _convert(self, sample: dict[str, Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._sample_rng(index)
        image_seed = rng.getrandbits(63)
        with Image.open(io.BytesIO(sample["image"])) as im:
            im.load()
            # torchvision's random transforms draw from the global torch generator: seed it for this sample, and
            # give the caller's state back afterwards (with 0 workers the caller is the training process).
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(image_seed)
                image = self.image_transform(im)
        text = choose_text(sample, self.text_sources, self.text_weights, rng)
        return image, self.tokenizer(text)[0]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sample = super().__getitem__(index)
        position = int(getattr(index, "index", index))
        try:
            out = self._convert(sample, position)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            self.num_skipped += 1
            if self.num_skipped <= 10 or self.num_skipped % 100 == 0:
                worker = torch.utils.data.get_worker_info()
                log.warning("skipped a corrupt sample (key=%r, index=%d: %s: %s); %d skipped so far in %s",
                            sample.get("key"), position, type(e).__name__, e, self.num_skipped,
                            f"loader worker {worker.id}" if worker else "the main process")
            out = self._replacement(position)
        self._last_good = out
        return out

    def _replacement(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last_good is not None:
            return self._last_good
        # The very first sample of this worker was bad: look for a readable neighbour.
        n = len(self)
        for step in range(1, min(n, 64)):
            j = (position + step) % n
            try:
                return self._convert(super().__getitem__(j), j)
            except Exception:
                self.num_skipped += 1
        raise RuntimeError(f"no readable image among 64 consecutive samples of {self.input_dir.path!r}; "
                           "is the directory a prepared image-text dataset?")


def batch_sizes_per_rank(dataset: StreamingDataset, batch_size: int, num_workers: int) -> list[list[list[int]]]:
    """The sizes of the batches that each loader worker of each rank yields in an epoch (``[rank][worker]``), from
    litdata's own split of the data over ranks and workers (the same in every epoch)."""
    dataset.get_len(num_workers, batch_size)  # creates litdata's shuffler, which owns the split
    workers = max(1, num_workers)
    env = dataset.distributed_env
    _, intervals = dataset.shuffler.get_chunks_and_intervals_per_workers(env, workers, batch_size, 1)
    items = [sum(interval[2] - interval[1] for interval in worker) for worker in intervals]
    sizes = [[batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else []) for n in items]
    return [sizes[rank * workers:(rank + 1) * workers] for rank in range(env.world_size)]


class _StreamingLoader(StreamingDataLoader):
    """litdata's StreamingDataLoader, which resumes at the sample position of a checkpoint, with one fix.

    ``load_state_dict`` sets ``restore``, so that the next iteration continues from the saved position instead of
    starting a new epoch; litdata clears it only when that iteration runs to its end. Lightning stops asking for
    batches once it has the epoch's count, so it never does, and the epoch after a resumed one would then "resume"
    at the end of the data and train on nothing. The saved position is applied when the iteration starts (the
    workers are given their indexes then), so ``restore`` is cleared once the first batch arrives.
    """

    def __iter__(self) -> Any:
        resuming = self.restore
        for batch in super().__iter__():
            if resuming:
                self.restore = resuming = False
            yield batch


class ImageTextDataModule(L.LightningDataModule):
    """Streams prepared LitData directories as ``(images (B,3,S,S) float, tokens (B,context_length) long)``.

    Args:
        train_dir: prepared training directory (local path or a litdata remote URL such as ``s3://...``).
        val_dir: optional prepared validation directory (eval transform, fixed text per sample).
        tokenizer: ``tokenizer.json`` or CLIP's ``bpe_simple_vocab_16e6.txt.gz``.
        context_length: token sequence length (sot + text + eot, right-padded).
        image_size: side of the square crops.
        batch_size: per-device batch size.
        val_batch_size: defaults to ``batch_size``.
        num_workers: loader worker processes per device.
        text_sources: which texts to draw from, any of ``text``, ``synthetic_caption``, ``generated_caption``
            (or another string field of your data). ``[text]`` disables the generated descriptions.
        weights: relative draw weight per source (same length as ``text_sources``); None = uniform.
        seed: the seed of the shuffle and of every sample's text choice and augmentation.
        shuffle: shuffle the training set every epoch.
        drop_last: make every rank/worker see the same number of samples (needed by DDP).
        scale, ratio, hflip, interpolation: train augmentation: RandomResizedCrop's area and aspect ranges,
            the flip probability, and the resampling of the crop (the official training resizes bilinearly).
            Evaluation always resizes bicubically, as CLIP's preprocessing does.
        cache_dir, max_cache_size: litdata cache for remote data.
        torch_threads: if set, the number of intra-op CPU threads of the training process
            (``torch.set_num_threads``), set in ``setup``. Tiny models on a small CPU train faster with 1 thread
            beside the loader workers than with OpenMP threads waiting for a core.

    ``vocab_size`` (the tokenizer's) and ``context_length`` and ``image_size`` are what the towers are built with:
    main.py links them into the text tower's ``vocab_size`` and ``context_length`` and the image tower's
    ``img_size``, so a config gives each number once.
    """

    def __init__(
        self,
        train_dir: str,
        tokenizer: str,
        val_dir: str | None = None,
        context_length: int = 77,
        image_size: int = 224,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        text_sources: list[str] = list(TEXT_FIELDS),
        weights: list[float] | None = None,
        seed: int = 42,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = True,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (0.8, 1.25),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        torch_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_dir, self.val_dir, self.tokenizer_path = train_dir, val_dir, tokenizer
        self.context_length, self.image_size = int(context_length), int(image_size)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers, self.seed, self.shuffle, self.drop_last = int(num_workers), int(seed), shuffle, drop_last
        self.pin_memory = pin_memory
        self.text_sources = list(text_sources)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.scale, self.ratio, self.hflip, self.interpolation = tuple(scale), tuple(ratio), float(hflip), interpolation
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.torch_threads = torch_threads
        self._validate()
        self._tokenizer: Tokenizer | None = None
        self.train_dataset: ImageTextDataset | None = None
        self.val_dataset: ImageTextDataset | None = None

    # ---------------------------------------------------------------- config checks
    def _validate(self) -> None:
        if not self.text_sources:
            raise ValueError("text_sources is empty: enable at least one of "
                             f"{list(TEXT_FIELDS)} (e.g. `text_sources: [text]`)")
        if len(set(self.text_sources)) != len(self.text_sources):
            raise ValueError(f"text_sources has duplicates: {self.text_sources}; use `weights` to favour a source")
        for source in self.text_sources:
            if not isinstance(source, str) or source in ("image", "key", "tags", "label") or not source:
                raise ValueError(f"unknown text source {source!r} in text_sources: use "
                                 f"{list(TEXT_FIELDS)} or another text field of your data (tags are LLM input only)")
        if self.weights is not None:
            if len(self.weights) != len(self.text_sources):
                raise ValueError(f"weights has {len(self.weights)} values but text_sources has "
                                 f"{len(self.text_sources)} ({self.text_sources}): give one weight per source")
            if any(w < 0 or w != w for w in self.weights):
                raise ValueError(f"weights must be >= 0, got {self.weights}")
            if sum(self.weights) <= 0:
                raise ValueError(f"weights sum to 0 ({self.weights}): at least one source needs a positive weight")
        for name, value in (("batch_size", self.batch_size), ("val_batch_size", self.val_batch_size),
                            ("image_size", self.image_size), ("context_length", self.context_length - 1)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be a positive number of threads or null, got {self.torch_threads}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(_INTERPOLATIONS)}, got {self.interpolation!r}")

    def _check_dir(self, path: str, what: str) -> None:
        if path.startswith(_REMOTE_PREFIXES):
            return  # checked by ImageTextDataset once litdata has fetched the index
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{what} {path!r} does not exist; create it with "
                f"`python -m rwkv_clip.datamodules.prepare --input <your csv/jsonl/parquet/folder/tars> --output {path}`")
        if not os.path.isfile(os.path.join(path, "index.json")):
            raise FileNotFoundError(
                f"{what} {path!r} is not a prepared LitData directory (no index.json); prepare it with "
                f"`python -m rwkv_clip.datamodules.prepare ... --output {path}`")
        check_prepared_dir(path)  # a damaged index.json or a code-running format, named before litdata reads it

    def _check_split(self, dataset: ImageTextDataset, path: str, what: str, batch_size: int) -> None:
        """Refuse, at start-up, a split that would hang DDP.

        Every training step gathers the features of all ranks, and DDP all-reduces the gradients, so every rank
        must take the same number of steps with batches of the same size. Validation has no collective per batch
        (see CLIPModule.validation_step), but each rank must have at least one batch for the loss to be averaged
        over ranks once, at the end.
        """
        sizes = batch_sizes_per_rank(dataset, batch_size, self.num_workers)
        world_size = len(sizes)
        per_rank = [sum(len(worker) for worker in rank) for rank in sizes]
        devices = f"{world_size} device{'s' if world_size > 1 else ''}"
        if what == "train_dir":
            if sum(per_rank) == 0:
                raise ValueError(f"{what} {path!r} has {dataset.num_samples} samples: not one batch of {batch_size} "
                                 f"for each of {devices}; lower data.init_args.batch_size")
            if any(rank != sizes[0] for rank in sizes):
                left = sum(sum(worker) for worker in sizes[-1]) - sum(sum(worker) for worker in sizes[0])
                raise ValueError(
                    f"{what} {path!r} with drop_last: false splits unevenly over {devices}: the ranks get "
                    f"{per_rank} batches (of up to {batch_size}; the last rank {left} more samples). Every "
                    "training step gathers features from all ranks, so the run would hang at the first step one "
                    "rank does not take. Set data.init_args.drop_last: true (each epoch then leaves out fewer than "
                    f"{batch_size * world_size} samples, different ones each epoch when shuffled).")
        elif min(per_rank) == 0:
            raise ValueError(
                f"{what} {path!r} gives the ranks {per_rank} validation batches of {batch_size} on {devices} "
                "(litdata splits whole batches over ranks): every rank needs at least one. Lower "
                f"data.init_args.val_batch_size to at most {dataset.num_samples // world_size}.")

    def _check_fields(self, dataset: ImageTextDataset, path: str, what: str) -> None:
        fields = dataset.fields
        if fields is None:  # an unusual index layout only disables the schema check
            return
        if "image" not in fields:
            raise ValueError(f"{what} {path!r} has no 'image' field (fields: {fields}); it was not written by "
                             "rwkv_clip.datamodules.prepare")
        if not any(s in fields for s in self.text_sources):
            raise ValueError(f"{what} {path!r} has none of the text sources {self.text_sources} (fields: {fields})")
        missing = [s for s in self.text_sources if s not in fields]
        if missing:
            log.warning("%s %r has no field(s) %s: samples draw from the other sources", what, path, missing)

    # ---------------------------------------------------------------- public attributes
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path, self.context_length)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: every id it gives is below it."""
        return self.tokenizer.vocab_size

    @property
    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return train_transform(self.image_size, self.scale, self.ratio, self.hflip, self.interpolation)

    @property
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return eval_transform(self.image_size)

    # ---------------------------------------------------------------- lightning hooks
    def _dataset(self, path: str, train: bool) -> ImageTextDataset:
        kwargs: dict[str, Any] = {}
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        return ImageTextDataset(
            path, tokenizer=self.tokenizer,
            image_transform=self.train_transform if train else self.eval_transform,
            text_sources=self.text_sources, weights=self.weights, text_seed=self.seed, fixed_text=not train,
            shuffle=self.shuffle if train else False, drop_last=self.drop_last if train else False,
            seed=self.seed, max_cache_size=self.max_cache_size, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        # Created here, not in __init__, so each DDP rank builds its own dataset and litdata splits by rank.
        if stage in (None, "fit") and self.train_dataset is None:
            self._check_dir(self.train_dir, "train_dir")
            self.train_dataset = self._dataset(self.train_dir, train=True)
            self._check_fields(self.train_dataset, self.train_dir, "train_dir")
            self._check_split(self.train_dataset, self.train_dir, "train_dir", self.batch_size)
        if stage in (None, "fit", "validate") and self.val_dir is not None and self.val_dataset is None:
            self._check_dir(self.val_dir, "val_dir")
            self.val_dataset = self._dataset(self.val_dir, train=False)
            self._check_fields(self.val_dataset, self.val_dir, "val_dir")
            self._check_split(self.val_dataset, self.val_dir, "val_dir", self.val_batch_size)

    def _loader(self, dataset: ImageTextDataset, batch_size: int) -> StreamingDataLoader:
        # A generator of its own: starting an epoch would otherwise draw the workers' base seed from the global
        # one, which the model's drop path uses, so model randomness would depend on how often loaders start
        # (validation, a resume). Nothing in a sample depends on that seed (see ImageTextDataset._sample_rng).
        return _StreamingLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=False,
                                generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> StreamingDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size)

    def val_dataloader(self) -> StreamingDataLoader | list:
        if self.val_dir is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.val_batch_size)
