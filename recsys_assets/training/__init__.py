"""Distributed TorchRec training (no Dagster or Spark in here).

- `recsys_assets.training.loop`: the one training loop (epochs, early stopping, checkpoints, resume, reports).
- `recsys_assets.training.two_tower` / `.dlrm`: `train_two_tower(config)` / `train_dlrm(config)`, the models'
  loop hooks; also ``torchrun --nproc_per_node N -m recsys_assets.training.two_tower --config cfg.json``.
- `recsys_assets.training.trainer_config` (config fields, JSON configs, the trainers' entry and CLI),
  `.distributed` (process group, seeding, collectives), `.sharding` (sharding, optimizers, state dicts),
  `.streaming` (MDS loaders), `.reporting` (progress to MLflow / a JSON lines file), `.checkpoint`.
"""
