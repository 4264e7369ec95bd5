"""A run's step as the planner predicts it, for `nanotrain report`'s predicted-vs-measured section.

The run's config.json names everything the planner needs: the model, the layout (fixed whole, so
the search weighs that one layout), the schedule, the recomputation, the global batch and the
sequence. The cluster is this machine measured (`--hardware cpu`: cluster.cpu_cluster, with as
many processes as the run had), since that is where `nanotrain train` ran the run. A run made on
another machine is compared with this one's figures: the page says so.
"""

from __future__ import annotations

import dataclasses

from ..config import Config, ConfigError
from ..parallel.layout import Layout
from .plan import Planner, Request, resolved_dtype, search
from .plan_page import plan_of, weigh_entry


def run_request(config: dict) -> Request:
    """The Request of a run's config.json: its layout fixed whole, on this CPU."""
    from .cluster import cpu_cluster

    cfg = Config.from_dict(config, source="the run's config.json")
    if cfg.train.device != "cpu":
        raise ConfigError(f"the run trained on {cfg.train.device}: the planner predicts runs of this CPU "
                          "(--hardware cpu) only here")
    layout = Layout.from_config(cfg)
    layout = dataclasses.replace(layout, micro=cfg.train.micro_batch(layout.dp))  # 0: batch_size / dp
    fixed = dataclasses.asdict(layout)
    cluster = cpu_cluster(layout.world_size, cfg.train.threads)
    dtype = resolved_dtype(cfg.precision.recipe, cluster)
    if cfg.precision.recipe == "auto":
        cfg.precision.recipe = "fp32" if dtype == "fp32" else "bf16"
    m = dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, cfg.train.seq_len))
    return Request(m, cfg, cluster, layout.world_size, cfg.train.batch_size, cfg.train.seq_len, fixed,
                   cfg.parallel.pp_schedule if layout.pp > 1 else None, cfg.train.recompute, dtype, 1)


def predict_run(config: dict) -> dict:
    """The planner's entry for the run's layout (plan_page.weigh_entry: the --json fields, memory by
    kind, the played timetable) and the cluster it assumed."""
    req = run_request(config)
    planner = Planner(req)
    best = search(req, planner=planner)["candidates"][0]
    out = weigh_entry(req, planner, plan_of(req, best), "run")
    out.pop("neighbours")
    out["cluster"] = req.cluster.describe()
    return out
