"""The LightningCLI behind main.py."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jsonargparse import Namespace
from jsonargparse._link_arguments import skip_apply_links
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rwkv_clip.module import CLIPModule

# Model settings that choose how the model is computed, not what it computes: a run from a checkpoint may change
# them (e.g. resume on fewer GPUs with micro-batches, or evaluate with another WKV backend).
RUNTIME_SETTINGS = frozenset({"compile_towers", "micro_batch_size", "wkv_backend", "grad_checkpointing"})


@functools.lru_cache(maxsize=8)
def _tokenizer_vocab_size(path: str) -> int:
    from rwkv_clip.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path).vocab_size
    except (OSError, ValueError) as e:
        raise ValueError(f"data.init_args.tokenizer {path!r} cannot be read ({e}); the text tower's vocab_size is "
                         "taken from it: give a tokenizer.json, CLIP's bpe_simple_vocab_16e6.txt.gz, or clip") from None


def data_vocab_size(data: Optional[Namespace]) -> Optional[int]:
    """The vocabulary of the data's tokenizer: read from its ``tokenizer`` file, or for a data module that trains
    its own tokenizer (the demo) the ``vocab_size`` it trains to, known before the tokenizer exists. None when the
    data module names neither (e.g. a bare LightningDataModule in an evaluation config)."""
    args = data.get("init_args") if isinstance(data, Namespace) else None
    if not args:
        return None
    if args.get("tokenizer"):
        return _tokenizer_vocab_size(str(args.tokenizer))
    return None if args.get("vocab_size") is None else int(args.vocab_size)


def _data_setting(name: str) -> Callable[[Optional[Namespace]], Any]:
    return lambda data: (data.get("init_args") or Namespace()).get(name) if isinstance(data, Namespace) else None


def _vocab_source(data: Optional[Namespace]) -> str:
    tokenizer = _data_setting("tokenizer")(data)
    return f"the tokenizer data.init_args.tokenizer ({tokenizer})" if tokenizer else "data.init_args.vocab_size"


# Numbers that the data decide and the towers must be built with, each given once, in the data section:
# (where the data hold it, how to read it from the data section, the tower, the tower's argument).
LINKS = (
    (_vocab_source, data_vocab_size, "text_encoder", "vocab_size"),
    (lambda data: "data.init_args.context_length", _data_setting("context_length"), "text_encoder", "context_length"),
    (lambda data: "data.init_args.image_size", _data_setting("image_size"), "image_encoder", "img_size"),
)


def _linked(read: Callable[[Optional[Namespace]], Any], tower_argument: str) -> Callable[[Any, Any], Any]:
    """compute_fn of a link: the data's value, or the tower's own when the data module does not have one."""
    def compute(data: Any, tower: Any) -> Any:
        value = read(data)
        if value is None and isinstance(tower, Namespace):
            return (tower.get("init_args") or Namespace()).get(tower_argument)
        return value
    return compute


class CLI(LightningCLI):
    """LightningCLI with the model taken from ``--ckpt_path`` and checked against the config.

    Lightning replaces the config's model settings with those saved in the checkpoint. Here a setting that the
    user gave (YAML or command line) and that differs from the checkpoint is an error naming each difference,
    instead of a silent change. A config without a model section takes the checkpoint's model whole (e.g.
    ``main.py validate --config configs/eval/... --ckpt_path X.ckpt``), and :data:`RUNTIME_SETTINGS` may differ.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # As LightningCLI's, except that the model is optional: with --ckpt_path it comes from the checkpoint.
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model,
                                        required=False)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=self.datamodule_class is not None)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The towers take the vocabulary, context length and image size from the data section (LINKS), so a
        # config gives each once. Applied on parse: the numbers are then in the model's hyperparameters, which is
        # what load_model rebuilds the towers from.
        for _, read, tower, argument in LINKS:
            parser.link_arguments(("data", f"model.init_args.{tower}"), f"model.init_args.{tower}.init_args.{argument}",
                                  compute_fn=_linked(read, argument), apply_on="parse")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # What the user set, without defaults or links: the YAML files and the command line.
        with skip_apply_links():
            if isinstance(args, (dict, Namespace)):
                self._given = parser.parse_object(args, defaults=False)
            else:
                self._given = parser.parse_args(args, defaults=False)

    def _dump_config(self) -> None:
        # The model's hyperparameters (what load_model rebuilds the towers from) are this dump. jsonargparse
        # leaves link targets out of a subclass's dumped init_args: put the towers' linked numbers back.
        if hasattr(self, "config_dump"):
            return
        super()._dump_config()
        config = self.config[self.config.subcommand] if "subcommand" in self.config else self.config
        model = self.config_dump.get("model") or {}
        for _, _, tower, argument in LINKS:
            value = config.get(f"model.init_args.{tower}.init_args.{argument}")
            node = (model.get("init_args") or {}).get(tower)
            if value is not None and isinstance(node, dict):
                node.setdefault("init_args", {})[argument] = value

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        config, given = (self.config[subcommand], self._given[subcommand]) if subcommand else (self.config, self._given)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and config.get("weights_only") is None:
            config["weights_only"] = True  # the trainer reads the checkpoint without unpickling code
        if ckpt_path and Path(ckpt_path).is_file():
            given_model = given.get("model")
            given_model = given_model.as_dict() if isinstance(given_model, Namespace) else given_model
            checkpoint_model = _checkpoint_model(ckpt_path)
            differences = _differences(given_model or {}, checkpoint_model)
            if differences:
                self.parser.error(
                    f"the model settings differ from the checkpoint {ckpt_path}:\n" + "\n".join(differences)
                    + "\nA run from a checkpoint continues its model: remove these settings, or match them to the "
                    "checkpoint. To train another model from those weights, start a new run without --ckpt_path.")
            if "class_path" in checkpoint_model or config.get("model") is not None:
                # The checkpoint's settings (all of them when main.py wrote it; all but the towers when the module
                # was built in Python), with the user's where they may differ (RUNTIME_SETTINGS).
                model = _merge(checkpoint_model, given_model or {})
                with skip_apply_links():  # the checkpoint's model as it is; the data must agree with it (below)
                    self.config = self.parser.parse_object({subcommand: {"model": model}} if subcommand else
                                                           {"model": model}, self.config)
        config = self.config[subcommand] if subcommand else self.config
        if config.get("model") is None:
            self.parser.error(f"the config has no model section: give one (see configs/), or a checkpoint written by "
                              "main.py with --ckpt_path to take the model from")
        problems = _link_problems(config, given, from_checkpoint=bool(ckpt_path and Path(ckpt_path).is_file()))
        if problems:
            self.parser.error("the data and the model disagree:\n" + "\n".join(problems))


def main(args=None, run: bool = True) -> LightningCLI:
    """Subclass mode for model and data, so YAML picks both by ``class_path``; each run directory gets the
    resolved ``config.yaml`` beside its TensorBoard events."""
    return CLI(
        CLIPModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


class _ParseOnly(CLI):
    def instantiate_classes(self) -> None:
        pass


def parse_config(*configs: str, args: Sequence[str] = ()) -> Namespace:
    """The config that ``main.py --config A --config B ... ARGS`` runs, links applied and checked, nothing built:
    for tools and tests that read what a stack of configs (a base recipe and its overlays) amounts to."""
    return _ParseOnly(CLIPModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=[*(f"--config={c}" for c in configs), *args], run=False).config


# --------------------------------------------------------------------------------------------------- helpers
def _link_problems(config: Namespace, given: Namespace, from_checkpoint: bool) -> list[str]:
    """One line per number of LINKS that the towers cannot take from the data: a tower without that argument, or
    a tower value that differs from the data's. A model that starts from weights (``--ckpt_path``, or
    ``pretrained_path``) keeps the weights' numbers (given in the config, or the checkpoint's), and data that fit
    them are fine: fewer tokens, shorter texts, any image size (the image towers resample their position
    embeddings)."""
    from_weights = from_checkpoint or bool(config.get("model.init_args.pretrained_path"))
    problems = []
    for source, read, tower, argument in LINKS:
        value = read(config.get("data"))
        data_key = source(config.get("data"))
        tower_config = config.get(f"model.init_args.{tower}")
        if value is None or not isinstance(tower_config, Namespace):
            continue
        tower_key = f"model.init_args.{tower}.init_args.{argument}"
        tower_args = tower_config.get("init_args") or Namespace()
        if argument not in tower_args:
            problems.append(f"  {data_key} gives {value!r}, but {tower_config.class_path} takes no {argument} "
                            f"({tower_key}): use a tower that does, or data without this setting")
            continue
        given_value = given.get(tower_key) if given.get(f"model.init_args.{tower}.init_args") else None
        tower_value = given_value if given_value is not None else tower_args[argument]
        if tower_value == value:
            continue
        if from_weights and (argument == "img_size" or value <= tower_value):
            tower_args[argument] = tower_value  # the weights' number, which the link had replaced
            continue
        where = "the checkpoint" if from_checkpoint and given_value is None else "the config"
        advice = (": more than the model's weights take" if from_weights else
                  ": leave the tower's out, main.py takes it from the data")
        problems.append(f"  {tower_key}: {tower_value!r} in {where}, but {data_key} gives {value!r}{advice}")
    return problems


def _checkpoint_model(ckpt_path: str) -> dict:
    """The checkpoint's model as a ``{class_path, init_args}`` config; without ``class_path`` when the module was
    built in Python (its towers are then not recorded either)."""
    from rwkv_clip.convert import is_official_state_dict, read_checkpoint

    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    if is_official_state_dict(checkpoint):
        raise SystemExit(
            f"error: {ckpt_path!r} is an official RWKV-CLIP file: convert it first (`python -m rwkv_clip.convert "
            f"{ckpt_path} model.ckpt`, then --ckpt_path model.ckpt), or fine-tune from it with "
            "--model.init_args.pretrained_path")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
    class_path = hparams.pop("_class_path", None)
    return {"init_args": hparams} if class_path is None else {"class_path": class_path, "init_args": hparams}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _normal(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_normal(v) for v in value]
    return value


def _same_class(a: str, b: str) -> bool:
    def resolve(path: str) -> Any:
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return path

    return a == b or resolve(a) is resolve(b)


def _differences(given: dict, checkpoint_model: dict) -> list[str]:
    """One line per model setting given by the user that differs from the checkpoint's."""
    saved = _flatten(checkpoint_model)
    differences = []
    for key, value in _flatten(given).items():
        if key not in saved or key.rpartition(".")[2] in RUNTIME_SETTINGS:
            continue  # a setting the checkpoint's version of the class did not have, or one that may change
        if key.endswith("class_path") and isinstance(value, str) and isinstance(saved[key], str):
            same = _same_class(value, saved[key])
        else:
            same = _normal(value) == _normal(saved[key])
        if not same:
            differences.append(f"  model.{key}: {value!r} in the config, {saved[key]!r} in the checkpoint")
    return differences


def _merge(checkpoint_model: dict, given: dict) -> dict:
    """The checkpoint's model config, with the given values of RUNTIME_SETTINGS."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in checkpoint_model.items()}
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif key in RUNTIME_SETTINGS:
            merged[key] = value
    return merged
