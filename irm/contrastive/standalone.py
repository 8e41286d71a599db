"""Explain any reward models on any comparisons, without a pipeline run: ``irm explain --rm SPEC ...``.

:func:`explain_rms` takes RM specs (``"vader"``, a lexicon ``.tsv``, ``"classifier:DIR?label=X"``,
``"probe:DIR"``, ``"logratio:RUN_DIR"``: see :func:`irm.rewards.load_rm`) or RM objects, and a
comparisons file (JSONL/CSV/JSON/parquet with settable field names) or ``"sample"``; it checks every
input before any model loads (specs parse, the file exists, the columns are there), explains, and
writes ``results.json``, ``contrastive.md`` and ``plots/`` to ``out``.

>>> res, section = explain_rms(["vader", "classifier:my-rm?label=POSITIVE"], "comparisons.jsonl",
...                            chosen_field="better", rejected_field="worse", out="runs/explain")
>>> section["sensitivity"]["vader"]["programmatic"]["top"]
'sentiment'
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from irm.contrastive.comparisons import SAMPLE, check_comparisons_source, load_comparisons
from irm.contrastive.explain import DEFAULT_MAX_PERPLEXITY_RATIO, Comparison, ContrastiveResult, explain
from irm.contrastive.fluency import DEFAULT_FLUENCY_MODEL, LMFluency
from irm.contrastive.perturb import GENERATORS, build_generator
from irm.contrastive.report import write_report
from irm.core.log import get_logger

__all__ = ["explain_rms", "check_rm_specs"]

log = get_logger(__name__)

_OFF = ("none", "off", "false", "no", "")


def check_rm_specs(rms: Any) -> list[tuple[str | None, Any]]:
    """``[(name or None, spec or RM)]`` after checking every spec parses (nothing is loaded)."""
    from irm.rewards import parse_rm_spec

    if isinstance(rms, (str, bytes)) or not isinstance(rms, (Sequence, Mapping)):
        rms = [rms]
    items = list(rms.items()) if isinstance(rms, Mapping) else [(None, r) for r in rms]
    if not items:
        raise ValueError("No reward models to explain; pass at least one, e.g. --rm vader.")
    for _, r in items:
        if isinstance(r, str):
            parse_rm_spec(r)  # raises ValueError / FileNotFoundError with the valid forms
        elif not callable(getattr(r, "score", None)):
            raise TypeError(f"{r!r} is neither an RM spec string nor a reward model with score(prompts, responses).")
    return items


def _fluency(fluency_model: Any) -> Any:
    if fluency_model is None or (isinstance(fluency_model, str) and fluency_model.strip().lower() in _OFF):
        return None
    if isinstance(fluency_model, str):
        from irm.core.constants import EMBEDDED_MODELS
        from irm.models import resolve_checkpoint

        try:
            kind, _ = resolve_checkpoint(fluency_model)  # a typo fails here, before anything loads
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"fluency model {fluency_model!r}: {e} (use 'none' to skip the fluency check)") from e
        if kind == "hub" and "/" not in fluency_model:
            import difflib

            close = difflib.get_close_matches(fluency_model, list(EMBEDDED_MODELS) + ["tiny-llama"], n=1)
            raise ValueError(f"fluency model {fluency_model!r} is no embedded model, local path or hub name (org/name)"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + " Use 'none' to skip the fluency check.")
        return LMFluency(fluency_model)
    return fluency_model if callable(getattr(fluency_model, "perplexity", None)) else LMFluency(fluency_model)


def explain_rms(
    rms: Any,
    comparisons: str | Path | Sequence[Comparison] = SAMPLE,
    *,
    out: str | Path | None = None,
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
    limit: int | None = 30,
    attributes: Sequence[str] | None = None,
    generators: Sequence[Any] = ("programmatic",),
    fluency_model: Any = DEFAULT_FLUENCY_MODEL,
    max_perplexity_ratio: float | None = DEFAULT_MAX_PERPLEXITY_RATIO,
    semantic: bool = False,
    n_bootstrap: int = 1000,
    n_variants: int = 1,
    seed: int = 0,
    cli: bool = False,
    **explain_kw: Any,
) -> tuple[ContrastiveResult, dict[str, Any]]:
    """Explain reward models on comparisons, standalone; return the result and the report section.

    ``rms``: RM specs or objects (a list, or a dict name -> spec/RM). ``comparisons``: a file, a hub
    dataset, ``"sample"`` or a list of :class:`Comparison`. ``prompt_field=None`` (or ``""``) splits
    HH-RLHF dialogues. ``fluency_model``: the LM whose perplexity screens perturbations (default the
    embedded SmolLM2; ``None``/``"none"`` turns the check off). ``semantic``: MiniLM semantic distances
    (slower). ``out``: where ``results.json``, ``contrastive.md`` and ``plots/`` go (None: nothing written).
    """
    from irm.rewards import load_rm

    t0 = time.perf_counter()
    # ---- everything checked before a model loads
    items = check_rm_specs(rms)
    prompt_field = prompt_field or None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(comparisons, (str, Path)):
        source = check_comparisons_source(comparisons, prompt_field=prompt_field, chosen_field=chosen_field,
                                          rejected_field=rejected_field, cli=cli)
    else:
        source = "given"
        comparisons = list(comparisons)
        if not comparisons or not all(isinstance(c, Comparison) for c in comparisons):
            raise TypeError("comparisons must be a path, 'sample', or a non-empty list of Comparison.")
    gen_objs = []
    for g in generators:
        if isinstance(g, str):
            if g not in GENERATORS:
                build_generator(g)  # raises with the valid names
            if g == "llm_rewrite":
                raise ValueError("generator 'llm_rewrite' needs an LLM client: pass "
                                 "LLMRewriteGenerator(LLMConfig(...).build()) instead of the name.")
            gen_objs.append(build_generator(g))
        else:
            gen_objs.append(g)
    flu = _fluency(fluency_model)
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a directory; name a directory.")

    # ---- load
    comps = (load_comparisons(source, prompt_field=prompt_field, chosen_field=chosen_field,
                              rejected_field=rejected_field, split=split, limit=limit)
             if source != "given" else comparisons[:limit] if limit else comparisons)
    rm_dict: dict[str, Any] = {}
    for name, r in items:
        rm = load_rm(r) if isinstance(r, str) else r
        key = name or getattr(rm, "name", None) or str(r)
        if key in rm_dict:  # two specs of one kind (two lexicons): name them by their spec
            key = str(r) if isinstance(r, str) else f"{key}_{len(rm_dict)}"
        if key in rm_dict:
            raise ValueError(f"Two reward models are named {key!r}; pass a dict name -> spec instead.")
        rm_dict[key] = rm
    log.info("explain: %d comparisons (%s), RMs %s", len(comps), source, list(rm_dict))
    result = explain(comps, rm_dict, attributes=attributes, generators=gen_objs, n_variants=n_variants,
                     embedder="minilm" if semantic else None, seed=seed, n_bootstrap=n_bootstrap,
                     fluency=flu, max_perplexity_ratio=max_perplexity_ratio, **explain_kw)
    extra = {"source": str(source), "seconds": time.perf_counter() - t0,
             "rm_specs": {k: (str(r) if isinstance(r, str) else type(r).__name__)
                          for k, (_, r) in zip(rm_dict, items)},
             "fields": {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field}}
    section = (write_report(result, out, extra=extra, results_json=True) if out is not None
               else {**result.summary(), **extra})
    return result, section
