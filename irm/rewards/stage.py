"""The ``reward`` stage: build the explicit RM of ``[reward]``."""

from __future__ import annotations

from typing import Any

import numpy as np

from irm.run.registry import RunContext, stage

__all__: list[str] = []


@stage("reward", order=10)
def _stage_reward(ctx: RunContext) -> None:
    """Build the explicit RM and record what it says of the prompts themselves."""
    ctx.rm = ctx.cfg.reward.build()
    r = ctx.rm.score(ctx.test_prompts, [""] * len(ctx.test_prompts))
    info: dict[str, Any] = {"name": ctx.rm.name, "kind": ctx.cfg.reward.kind,
                            "held_out_prompt_reward": {"mean": float(np.mean(r)), "std": float(np.std(r))}}
    if hasattr(ctx.rm, "table"):
        info["table_size"] = len(ctx.rm.table)
    ctx.run.update_results("reward", info)
