"""The trainers' configs and entry points: `setting` (a config field the model's Dagster config exposes too),
the `JsonConfig` mixin (JSON round trip of the dataclass configs), `run_trainer` (what every trainer's public
entry does: threads, the process group, then the training) and `trainer_cli` (the torchrun command line). No
Dagster / Spark here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recsys_assets.training.distributed import init_distributed, shutdown_distributed
from recsys_assets.training.reporting import _json_default


def setting(default: Any, help: str) -> Any:
    """A training-config field that the model's Dagster config exposes too, with this description
    (recsys_assets.defs.configs derives the Dagster Config from these fields: one declaration)."""
    return dataclasses.field(default=default, metadata={"help": help})


class JsonConfig:
    """Mixin for the trainers' dataclass configs: JSON round trip (tuples as lists); unknown fields refused."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def run_trainer(config: Any, config_cls: type, train: Any) -> Any:
    """What every trainer's public entry does: the config from a dict if needed, torch threads, the process group
    (destroyed at the end if created here), then ``train(config, env, t_start)``."""
    if not isinstance(config, config_cls):
        config = config_cls.from_dict(config)
    t_start = time.time()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    env = init_distributed(config.use_gpu, single_node=config.single_node)
    try:
        return train(config, env, t_start)
    finally:
        shutdown_distributed(env)


# What a torchrun run prints of its result (both trainers' results have these fields).
CLI_SUMMARY_FIELDS = ("best_epoch", "final_metrics", "samples_per_second", "world_size", "total_seconds")


def trainer_cli(argv: Sequence[str] | None, *, description: str, config_cls: type, train: Any) -> int:
    """``--config cfg.json [--result out.pt]`` under torchrun: rank 0 writes the result with torch.save and prints
    the result's CLI_SUMMARY_FIELDS as one JSON line."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"JSON file of {config_cls.__name__} fields")
    parser.add_argument("--result", default=None, help="where rank 0 writes the result (torch.save)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("recsys_assets").setLevel(logging.INFO)
    result = train(config_cls.from_json(Path(args.config).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        if args.result:
            Path(args.result).parent.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.result)
        summary = {k: getattr(result, k) for k in CLI_SUMMARY_FIELDS}
        print(json.dumps(summary, default=_json_default), flush=True)
    return 0
