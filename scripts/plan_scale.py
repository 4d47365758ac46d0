"""Sharding plans at production size, from TorchRec's own planner, without a GPU.

Builds the project's Two Tower and DLRM (the same model code and table layout as training) with
100M users / 10M items on the meta device, fuses RowWiseAdagrad into the embedding backward as training does
(so the planner counts its optimizer state), and runs `EmbeddingShardingPlanner.plan` for a CUDA topology of
W GPUs (8 per host). Prints, per model and world size, every table's size, the chosen sharding type / kernel
/ ranks, and the planner's per-rank storage estimate (HBM and host DDR) against the capacity.

    python scripts/plan_scale.py                       # 100M users, 10M items, dim 64, 8 and 16 GPUs, 80 GB
    python scripts/plan_scale.py --world-sizes 8 16 32 --hbm-gb 141 --dim 128

Planning needs no GPU (it is arithmetic over table shapes); it also runs with the CPU build of fbgemm.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1024**3


def two_tower_module(
    num_users: int, num_items: int, num_categories: int, attrs: dict[str, int], dim: int, history_length: int
):
    from recsys_assets.data.schema import DatasetMeta
    from recsys_assets.models.two_tower import TwoTowerTrainTask, build_two_tower, embedding_bag_configs
    from recsys_assets.training.two_tower import TwoTowerTrainConfig

    meta = DatasetMeta(
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        user_attribute_cardinalities=attrs,
        history_length=history_length,
        rows={},
    )
    cfg = TwoTowerTrainConfig(data_root="-", embedding_dim=dim, layer_sizes=(2 * dim, dim), use_user_id=True)
    spec = cfg.feature_spec(meta)
    tower = build_two_tower(spec, cfg.model_config(), device="cpu", table_device="meta")
    return TwoTowerTrainTask(tower), [tower.ebc], embedding_bag_configs(spec, dim)


def dlrm_module(num_users: int, num_items: int, num_categories: int, attrs: dict[str, int], dim: int):
    from recsys_assets.data.ranking import DENSE_FEATURES
    from recsys_assets.models.dlrm import (
        DLRMModelConfig,
        DLRMTrainTask,
        build_dlrm,
        embedding_bag_configs,
        layout_from_dicts,
    )

    # every sparse feature switched on (data.ranking.sparse_layout with use_user_id/use_item_id/use_history):
    # the largest DLRM this code builds
    layout = [
        dict(name="user", table="user", num_embeddings=num_users),
        dict(name="item", table="item", num_embeddings=num_items),
        dict(name="history", table="item", num_embeddings=num_items, multi_valued=True),
        dict(name="categories", table="category", num_embeddings=num_categories, multi_valued=True),
        *[dict(name=f"attr_{k}", table=f"attr_{k}", num_embeddings=v) for k, v in attrs.items()],
    ]
    layout = layout_from_dicts(layout)
    config = DLRMModelConfig(
        dense_in_features=len(DENSE_FEATURES),
        embedding_dim=dim,
        bottom_layer_sizes=(64, dim),
        top_layer_sizes=(256, 64, 1),
    )
    dlrm = build_dlrm(layout, config, device="cpu", table_device="meta")
    return DLRMTrainTask(dlrm), [dlrm.sparse_arch.embedding_bag_collection], embedding_bag_configs(layout, dim)


def plan(
    module,
    ebcs,
    tables,
    world_size: int,
    local_world_size: int,
    hbm_gb: float,
    ddr_gb: float,
    batch_size: int,
    sharding_types,
):
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys_assets.training.sharding import sharding_constraints

    for ebc in ebcs:  # as sharding.shard_model: the planner sizes optimizer state from the fused optimizer
        if not any(hasattr(p, "_optimizer_classes") for p in ebc.parameters()):
            _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05, "eps": 1e-8})
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device="cuda",
        hbm_cap=int(hbm_gb * GB),
        ddr_cap=int(ddr_gb * GB),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=sharding_constraints(tables, sharding_types)
    )
    sharding_plan = planner.plan(module, [EmbeddingBagCollectionSharder()])
    return planner, sharding_plan, topology


def report(name: str, tables, planner, topology, world_size: int, hbm_gb: float, ddr_gb: float) -> None:
    options = planner.get_selected_options()
    print(
        f"\n=== {name}: world_size={world_size} (cuda, {topology.local_world_size} GPUs/host), "
        f"hbm_cap={hbm_gb:g} GiB, ddr_cap={ddr_gb:g} GiB per rank ==="
    )
    dims = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    print(f"{'table':<22}{'rows':>13}{'dim':>5}{'fp32 GiB':>10}  {'sharding':<17}{'kernel':<10}{'shards':>7}  ranks")
    for opt in sorted(options, key=lambda o: -dims.get(o.name, (0, 0))[0]):
        rows, dim = dims.get(opt.name, (0, 0))
        ranks = sorted({s.rank for s in opt.shards})
        rank_text = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 4 else ",".join(map(str, ranks))
        print(
            f"{opt.name:<22}{rows:>13,}{dim:>5}{rows * dim * 4 / GB:>10.2f}  {opt.sharding_type:<17}"
            f"{opt.compute_kernel:<10}{len(opt.shards):>7}  {rank_text}"
        )
    hbm, ddr = defaultdict(int), defaultdict(int)
    for opt in options:
        for s in opt.shards:
            hbm[s.rank] += s.storage.hbm
            ddr[s.rank] += s.storage.ddr
    total_hbm = sum(hbm.values())
    print("planner's storage estimate per rank (embedding shards incl. RowWiseAdagrad state, lookup I/O):")
    print(f"{'rank':>5}{'HBM GiB':>10}{'of cap':>8}{'DDR GiB':>10}")
    for r in range(world_size):
        print(f"{r:>5}{hbm[r] / GB:>10.2f}{100 * hbm[r] / (hbm_gb * GB):>7.1f}%{ddr[r] / GB:>10.2f}")
    print(
        f"total HBM {total_hbm / GB:.2f} GiB; max rank {max(hbm.values()) / GB:.2f} GiB, "
        f"min rank {min(hbm.get(r, 0) for r in range(world_size)) / GB:.2f} GiB"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=float, default=100e6)
    p.add_argument("--items", type=float, default=10e6)
    p.add_argument("--categories", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64, help="embedding dim of both models")
    p.add_argument("--history-length", type=int, default=20)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--hbm-gb", type=float, default=80.0, help="HBM per GPU (80: A100/H100 80GB; 141: H200)")
    p.add_argument("--ddr-gb", type=float, default=128.0, help="host memory the planner may use per rank")
    p.add_argument("--batch-size", type=int, default=4096, help="per-rank batch (the planner sizes lookup I/O)")
    p.add_argument("--models", nargs="+", default=["two_tower", "dlrm"], choices=["two_tower", "dlrm"])
    p.add_argument(
        "--sharding-types",
        nargs="+",
        default=None,
        help="allowed ShardingType values (default: training's GPU set, sharding.GPU_SHARDING_TYPES)",
    )
    p.add_argument("--planner-stats", action="store_true", help="also print the planner's own stats table")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if args.planner_stats else logging.WARNING, format="%(message)s")
    from recsys_assets.training.sharding import GPU_SHARDING_TYPES

    sharding_types = tuple(args.sharding_types or GPU_SHARDING_TYPES)
    users, items = int(args.users), int(args.items)
    attrs = {"age_group": 8, "region": 250}
    print(
        f"users={users:,} items={items:,} categories={args.categories:,} dim={args.dim} "
        f"allowed sharding types={list(sharding_types)} per-rank batch={args.batch_size}"
    )
    for model in args.models:
        for w in args.world_sizes:
            if model == "two_tower":
                module, ebcs, tables = two_tower_module(
                    users, items, args.categories, attrs, args.dim, args.history_length
                )
            else:
                module, ebcs, tables = dlrm_module(users, items, args.categories, attrs, args.dim)
            planner, _, topology = plan(
                module,
                ebcs,
                tables,
                w,
                min(w, args.gpus_per_host),
                args.hbm_gb,
                args.ddr_gb,
                args.batch_size,
                sharding_types,
            )
            report(model, tables, planner, topology, w, args.hbm_gb, args.ddr_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
