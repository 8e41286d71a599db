"""Where comparisons come from: a file or hub dataset, the packaged sample, or generations.

- :func:`load_comparisons`: ``"sample"`` (40 hand-written movie-review comparisons packaged with irm),
  a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or ``save_to_disk`` directory, or a Hugging
  Face dataset name (e.g. ``"Anthropic/hh-rlhf"``), through :func:`irm.data.load_records`. Data in the
  HH-RLHF layout (no prompt column; ``chosen``/``rejected`` hold the whole dialogue) is split into the
  shared dialogue prefix (the prompt) and the two final assistant turns with ``prompt_field=None``.
- :func:`comparisons_from_pair`: the base and the tuned model answer the same prompts; the explicit
  RM orders each pair (its preferred response becomes ``chosen``); ties are dropped.
- :func:`comparisons_from_model`: two samples of one model (e.g. the base alone) per prompt, ordered
  by the explicit RM.

>>> comps = load_comparisons("sample", limit=30)
>>> comps[0].prompt, comps[0].chosen[:20]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from irm.contrastive.explain import Comparison
from irm.core.log import get_logger

__all__ = [
    "SAMPLE",
    "load_comparisons",
    "split_hh_dialogue",
    "order_by_rm",
    "comparisons_from_pair",
    "comparisons_from_model",
]

log = get_logger(__name__)

SAMPLE = "sample"
_SAMPLE_RESOURCE = "comparisons_sample.jsonl"
_HH_ASSISTANT = "\n\nAssistant:"


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into (prompt, chosen reply, rejected reply).

    The prompt is the shared text up to and including the last ``"\\n\\nAssistant:"`` both share.

    >>> split_hh_dialogue("\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "\\n\\nHuman: Hi\\n\\nAssistant: Go away.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello!', ' Go away.')
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)
    if cut < 0 or cut + len(_HH_ASSISTANT) > n:
        from irm.data import DataError

        raise DataError(
            "chosen and rejected share no '\\n\\nAssistant:' turn, so the prompt cannot be split off (HH-RLHF layout "
            f"expected); chosen starts {chosen[:60]!r}. Pass prompt_field= with a prompt column instead."
        )
    end = cut + len(_HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def load_comparisons(
    source: str | Path = SAMPLE,
    *,
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
    limit: int | None = None,
) -> list[Comparison]:
    """Comparisons from ``"sample"``, a local file/directory or a hub dataset (see the module doc).

    ``prompt_field=None`` splits HH-RLHF dialogues (:func:`split_hh_dialogue`).

    >>> load_comparisons("Anthropic/hh-rlhf", prompt_field=None, split="test", limit=30)
    """
    from irm.data import DataError, load_records

    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if str(source) == SAMPLE:
        text = resources.files("irm.resources").joinpath(_SAMPLE_RESOURCE).read_text(encoding="utf-8")
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        comps = [Comparison(r["prompt"], r["chosen"], r["rejected"], id=r.get("id", f"sample-{i}"))
                 for i, r in enumerate(rows)]
        return comps[:limit] if limit else comps
    fields = [chosen_field, rejected_field] + ([prompt_field] if prompt_field else [])
    rows = load_records(source, fields, split=split, limit=limit)
    comps = []
    for i, r in enumerate(rows):
        if prompt_field:
            p, c, rj = r[prompt_field], r[chosen_field], r[rejected_field]
        else:
            p, c, rj = split_hh_dialogue(r[chosen_field], r[rejected_field])
        if c == rj:
            log.warning("Comparison %d of %s has identical chosen and rejected responses; skipped", i, source)
            continue
        comps.append(Comparison(p, c, rj, id=f"{Path(str(source)).stem}-{i}"))
    if not comps:
        raise DataError(f"{source}: no usable comparisons (every row had identical chosen and rejected).")
    return comps


def order_by_rm(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], rm: Any, *, ids: Sequence[str] | None = None,
                limit: int | None = None) -> list[Comparison]:
    """Comparisons of ``a[i]`` vs ``b[i]`` with ``rm``'s preferred response as ``chosen``; ties dropped."""
    if not (len(prompts) == len(a) == len(b)):
        raise ValueError(f"prompts, a and b must have one length, got {len(prompts)}, {len(a)}, {len(b)}")
    margins = np.asarray(rm.compare_batch(list(prompts), list(a), list(b)), dtype=np.float64) if hasattr(
        rm, "compare_batch") else rm.score(list(prompts), list(a)) - rm.score(list(prompts), list(b))
    out = []
    for i, m in enumerate(margins):
        if m == 0 or a[i].strip() == b[i].strip() or not a[i].strip() or not b[i].strip():
            continue
        c, r = (a[i], b[i]) if m > 0 else (b[i], a[i])
        out.append(Comparison(prompts[i], c, r, id=ids[i] if ids else f"gen-{i}"))
        if limit and len(out) >= limit:
            break
    return out


def _generate_until(n: int, prompts: Sequence[str], make: Any) -> list[Comparison]:
    """Call ``make(prompt_chunk, offset)`` on chunks of ``n`` prompts until ``n`` comparisons (or 3 n prompts)."""
    prompts = list(prompts)[: 3 * n]
    if not prompts:
        raise ValueError("No prompts to generate comparisons from.")
    out: list[Comparison] = []
    for start in range(0, len(prompts), n):
        out += make(prompts[start : start + n], start)
        if len(out) >= n:
            break
    return out[:n]


def comparisons_from_pair(pair: Any, prompts: Sequence[str], rm: Any, n: int, *, max_new_tokens: int = 24,
                          temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                          memo: Any = None) -> list[Comparison]:
    """Base vs tuned responses to the same prompts, ordered by the explicit ``rm`` (ties dropped).

    Prompts are answered ``n`` at a time until ``n`` non-tied comparisons are found (ties are common
    for a lexicon RM on short texts), using at most ``3 n`` prompts. ``memo``: an
    :class:`irm.pair.evaluate.GenerationMemo` (completions of these prompts sampled earlier are continued).
    """
    from irm.core.threads import run_side_by_side
    from irm.models.generation import generate

    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size, memo=memo)

    def make(chunk: list[str], offset: int) -> list[Comparison]:
        base, tuned = run_side_by_side(  # at the same time on a CPU (irm.core.threads)
            [lambda: generate(pair.base.hf_model, pair.base.tokenizer, chunk, desc="contrastive: base", **kw),
             lambda: generate(pair.tuned.hf_model, pair.tuned.tokenizer, chunk, desc="contrastive: tuned", **kw)],
            [pair.base, pair.tuned])
        return order_by_rm(chunk, base.completions, tuned.completions, rm,
                           ids=[f"pair-{offset + i}" for i in range(len(chunk))])

    return _generate_until(n, prompts, make)


def comparisons_from_model(model: Any, prompts: Sequence[str], rm: Any, n: int, *, max_new_tokens: int = 24,
                           temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                           memo: Any = None) -> list[Comparison]:
    """Two samples of one model per prompt, ordered by the explicit ``rm`` (ties dropped)."""
    from irm.models.generation import generate

    def make(chunk: list[str], offset: int) -> list[Comparison]:
        g = generate(model.hf_model, model.tokenizer, chunk, n_samples_per_prompt=2, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed + offset, batch_size=batch_size, desc="contrastive: samples",
                     memo=memo)
        return order_by_rm(chunk, g.completions[0::2], g.completions[1::2], rm,
                           ids=[f"model-{offset + i}" for i in range(len(chunk))])

    return _generate_until(n, prompts, make)
