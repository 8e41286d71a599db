"""The model pair's own stages: RLHF-tuning the base against the explicit RM (:mod:`.tune`),
evaluating the pair on held-out prompts (:mod:`.evaluate`), per-layer divergence (:mod:`.divergence`),
and their pipeline stages (:mod:`.stages`)."""
