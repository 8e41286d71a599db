"""The linear IRM as a reward model of its own: a fitted probe that scores any word and any
(prompt, response) by running the model pair.

The ``irm`` stage fits ridge probes on the pair's activations at the slot of word templates ("The
movie was {w}"), to targets from the pair alone, and keeps the best unsupervised one. That probe is a
*token utility* function: for a word in context it reads the activation at the word's last token
(``hook``, from the tuned model, the base model or their difference) and returns

    utility = factor * (coef . x + intercept)

in the explicit table's units (``factor`` maps the probe's raw output onto the table's range, fixed at
fitting time). Two ways to use it:

- :meth:`ProbeRM.utilities_of_words`: words in the probe's own templates, averaged over templates, exactly
  as the stage computed its held-out reconstruction (the same numbers);
- :meth:`ProbeRM.score`: a (prompt, response) is scored like the lexicon it mirrors: the sum, over
  the words of the response, of each word's utility relative to the neutral words'
  (``utility - neutral_utility``: a word the pair does not care about adds about nothing), divided by
  ``scale`` and clipped to ``[-clip, clip]``. Each word is read where the model has read it in context.

Saved as ``probe.json`` (everything but the weights, and the pair's identities with their weight
fingerprints) and ``probe.safetensors`` (``coef``) in a directory; :meth:`ProbeRM.load` refuses a
model whose fingerprint differs from the one the probe was fitted on.

>>> rm = load_rm("probe:runs/default/irm_probe")          # loads the run's base and tuned models
>>> rm.utilities_of_words(["wonderful", "awful", "table"])
>>> rm.score(["The movie was"], [" wonderful, a joy to watch"])
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irm.activations.capture import CaptureRecord, capture_activations, response_words
from irm.core.log import get_logger
from irm.implicit.words import NEUTRAL_WORDS, TEMPLATES, word_records
from irm.rewards.base import BaseRewardModel, register_reward_model

__all__ = ["ProbeRM", "ProbeMeta", "ProbeComponent", "PROBE_JSON", "PROBE_WEIGHTS", "FEATURES"]

log = get_logger(__name__)

PROBE_JSON = "probe.json"
PROBE_WEIGHTS = "probe.safetensors"
FEATURES = ("tuned", "base", "diff")
FORMAT_VERSION = 2


@dataclass
class ProbeComponent:
    """One linear read-out: ``factor * (coef . x + intercept)`` with ``x`` the activation at ``hook`` of
    ``features`` (the tuned model, the base model, or tuned - base)."""

    hook: str
    features: str  # tuned | base | diff (= tuned - base)
    intercept: float
    factor: float  # raw probe output -> explicit table units (ensemble weights included)
    source: str = ""

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"Probe features {self.features!r} is not one of {FEATURES}.")


@dataclass
class ProbeMeta:
    """Everything of a probe but its weights. A probe is one linear read-out or the sum of several (an
    ensemble of the best cross-validated sources); a word's utility is the sum over components."""

    components: list[ProbeComponent]
    neutral_utility: float  # mean utility of the neutral words (the zero of sequence scores)
    scale: float = 1.0  # sequence reward = sum of word utilities / scale ...
    clip: float | None = None  # ... clipped to [-clip, clip]
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))
    neutral_words: list[str] = field(default_factory=lambda: list(NEUTRAL_WORDS))
    pair: dict[str, Any] = field(default_factory=dict)  # {"base": identity dict, "tuned": identity dict}
    source: str = ""  # which reconstruction source it is, e.g. "probe:triple/diff/blocks.20.hook_resid_post"
    fit: dict[str, Any] = field(default_factory=dict)  # what it was fitted on and how it did (for the record)
    max_length: int = 256
    batch_size: int = 32
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.components = [c if isinstance(c, ProbeComponent) else ProbeComponent(**c) for c in self.components]
        if not self.components:
            raise ValueError("A probe needs at least one component.")
        if not all("{w}" in t and t.rstrip().endswith("{w}") for t in self.templates):
            raise ValueError("Every probe template must end with its '{w}' slot.")

    @property
    def hooks(self) -> list[str]:
        return sorted({c.hook for c in self.components})

    @property
    def roles(self) -> list[str]:
        need = set()
        for c in self.components:
            need.update(("base", "tuned") if c.features == "diff" else (c.features,))
        return sorted(need)


class ProbeRM(BaseRewardModel):
    """A fitted linear probe on the pair's activations, used as a reward model (see the module docstring)."""

    def __init__(self, pair, meta: ProbeMeta, coef: np.ndarray | torch.Tensor, *, name: str = "irm_linear") -> None:
        self.pair = pair
        self.meta = meta
        self.coef = torch.as_tensor(np.asarray(coef, dtype=np.float64)).reshape(len(meta.components), -1)
        d = pair.tuned.d_model
        if self.coef.shape[1] != d:
            raise ValueError(f"Probe has {self.coef.shape[1]} weights per component but this model has d_model={d}.")
        self.name = name

    # -------------------------------------------------------------------------------------------
    @property
    def _roles(self) -> dict[str, Any]:
        return {r: getattr(self.pair, r) for r in self.meta.roles}

    def _utility(self, store) -> np.ndarray:
        """Summed utility of every row of a store holding the components' hooks."""
        cache: dict[tuple[str, str], torch.Tensor] = {}

        def act(role: str, hook: str) -> torch.Tensor:
            if (role, hook) not in cache:
                cache[role, hook] = store.load(role, hook, dtype=torch.float64)
            return cache[role, hook]

        total = None
        for c, w in zip(self.meta.components, self.coef, strict=True):
            x = act("tuned", c.hook) - act("base", c.hook) if c.features == "diff" else act(c.features, c.hook)
            u = c.factor * (x @ w + c.intercept)
            total = u if total is None else total + u
        return total.numpy()

    def _capture(self, records: list[CaptureRecord], positions: str, *, logprobs: bool = False):
        tmp = tempfile.TemporaryDirectory(prefix="irm-probe-")
        store = capture_activations(self._roles, records, Path(tmp.name) / "store", hooks=self.meta.hooks,
                                    positions=positions, batch_size=self.meta.batch_size, shard_size=4096,
                                    max_length=self.meta.max_length, dataset={"source": f"probe {self.name}"},
                                    share_prefix=True, logprobs=logprobs)
        return tmp, store

    def _logprob_counts(self, records: list[CaptureRecord]) -> list[tuple[int, int]] | None:
        """Per record (response tokens, all tokens) when the models share a log-probability memo
        (:func:`irm.models.memo.sharing_logprobs`) and every record can be scored untruncated; else None."""
        from irm.models.memo import logprob_memo

        if not records or any(logprob_memo(m) is None for m in self._roles.values()):
            return None
        tok = next(iter(self._roles.values())).tokenizer
        enc = tok([r.text for r in records], add_special_tokens=True, truncation=False, return_offsets_mapping=True)
        out = []
        for r, offs in zip(records, enc["offset_mapping"], strict=True):
            offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            n = int((offs[1:, 1] > r.prompt_chars).sum())  # response tokens; the first has no context
            if n == 0 or len(offs) > self.meta.max_length:
                return None
            out.append((n, len(offs)))
        return out

    def _publish_logprobs(self, store, records: list[CaptureRecord], counts: list[tuple[int, int]]) -> None:
        """Leave the capture's response log-probabilities in the models' memo for the log-ratio IRM and the
        fluency check (one forward pass serves the probe and them)."""
        from irm.models.memo import LogprobEntry, logprob_memo

        for role, m in self._roles.items():
            memo = logprob_memo(m)
            for r, total, (n, n_tokens) in zip(records, store.logprobs(role), counts, strict=True):
                p = r.text[: r.prompt_chars]
                memo[p, r.text[r.prompt_chars :]] = LogprobEntry(float(total), n, n_tokens)

    # -------------------------------------------------------------------------------------------
    def utilities_of_words(self, words: Sequence[str]) -> np.ndarray:
        """Each word's utility in the probe's templates (mean of the slot activations over templates),
        in the explicit table's units: what the ``irm`` stage reported for its held-out words."""
        words = [str(w) for w in words]
        if not words:
            return np.zeros(0)
        bad = [w for w in words if not w.strip() or "{w}" in w]
        if bad:
            raise ValueError(f"Words must be non-empty plain strings; got {bad[:3]}.")
        T = len(self.meta.templates)
        tmp, store = self._capture(word_records(words, self.meta.templates), "target")
        with tmp:
            # Linear: the mean over templates of the utility is the utility of the mean activation.
            return self._utility(store).reshape(len(words), T).mean(1)

    def token_utilities(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Per response: (word, utility relative to the neutral words) for each word, read at the word's
        last token in context (``prompt + response``)."""
        self._check_batch(prompts, responses)
        spans = [response_words(p + r, len(p)) for p, r in zip(prompts, responses, strict=True)]
        keep = [i for i, s in enumerate(spans) if s]
        out: list[list[tuple[str, float]]] = [[] for _ in prompts]
        if not keep:
            return out
        records = [CaptureRecord(prompts[i] + responses[i], prompt_chars=len(prompts[i])) for i in keep]
        counts = self._logprob_counts(records)
        tmp, store = self._capture(records, "words", logprobs=counts is not None)
        with tmp:
            u = self._utility(store) - self.meta.neutral_utility
            index = store.index()
            if counts is not None:
                self._publish_logprobs(store, records, counts)
        text_of_row, pos_of_row = index["text"], index["pos"]
        for j, i in enumerate(keep):
            rows = np.nonzero(text_of_row == j)[0]
            rows = rows[np.argsort(pos_of_row[rows])]
            text = prompts[i] + responses[i]
            # Rows are the words that survived truncation, in order: pair them with the first words.
            words = [text[s:e] for s, e in spans[i]][: len(rows)]
            out[i] = [(w, float(u[r])) for w, r in zip(words, rows, strict=False)]
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        totals = np.array([sum(u for _, u in tu) for tu in self.token_utilities(prompts, responses)],
                          dtype=np.float64) / self.meta.scale
        if self.meta.clip is not None:
            totals = np.clip(totals, -self.meta.clip, self.meta.clip)
        return totals

    # -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from irm.core.io import write_json_atomic

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"coef": self.coef.contiguous()}, str(path / PROBE_WEIGHTS))
        write_json_atomic(path / PROBE_JSON, {**asdict(self.meta), "name": self.name, "coef_dtype": "float64"})
        return path

    @classmethod
    def read(cls, path: str | Path) -> tuple[ProbeMeta, np.ndarray, str]:
        """(meta, coef, name) of a saved probe, without loading any model."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / PROBE_JSON).is_file() or not (path / PROBE_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a saved probe: it needs {PROBE_JSON} and {PROBE_WEIGHTS} (an "
                                    "irm run writes one to runs/NAME/irm_probe).")
        d = json.loads((path / PROBE_JSON).read_text())
        d["components"] = [ProbeComponent(**c) for c in d.get("components", [])]
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}/{PROBE_JSON} has format {d.get('format_version')}; this irm reads "
                             f"{FORMAT_VERSION}. Re-run the irm stage to save it again.")
        name = d.pop("name", "irm_linear")
        d.pop("coef_dtype", None)
        coef = load_file(str(path / PROBE_WEIGHTS))["coef"].double().numpy()
        return ProbeMeta(**d), coef, name

    @classmethod
    def load(cls, path: str | Path, pair=None, *, device: str = "cpu", name: str | None = None) -> ProbeRM:
        """A saved probe on ``pair`` (default: the models it was fitted on, by their recorded checkpoints).
        A model whose weight fingerprint differs from the recorded one is refused."""
        meta, coef, saved_name = cls.read(path)
        if pair is None:
            from irm.models import ModelPair, load_model

            refs = {}
            for role in ("base", "tuned"):
                ident = meta.pair.get(role) or {}
                ckpt = ident.get("checkpoint")
                refs[role] = ckpt if ckpt and Path(ckpt).exists() else ident.get("spec")
                if not refs[role]:
                    raise ValueError(f"{path}/{PROBE_JSON} records no {role} model; pass the pair: "
                                     "ProbeRM.load(path, pair).")
            pair = ModelPair(load_model(refs["base"], device=device), load_model(refs["tuned"], device=device))
        check_pair(meta, pair, where=str(path))
        return cls(pair, meta, coef, name=name or saved_name)

    def __repr__(self) -> str:
        return f"ProbeRM(name={self.name!r}, source={self.meta.source!r})"


def check_pair(meta: ProbeMeta, pair, *, where: str = "probe") -> None:
    """Refuse a pair whose models are not those the probe was fitted on (weight fingerprints differ)."""
    for role in ("base", "tuned"):
        want = (meta.pair.get(role) or {}).get("fingerprint")
        got = getattr(getattr(pair, role).identity, "fingerprint", None)
        if want and got and want != got:
            raise ValueError(f"{where}: the probe was fitted on a {role} model with weight fingerprint {want[:12]}, "
                             f"but this {role} model ({getattr(pair, role).identity.spec}) has {got[:12]}. A probe "
                             "reads one model's activations; fit it again on this pair (irm run).")


@register_reward_model("probe")
def _build_probe(path: str, device: str = "cpu", name: str | None = None) -> ProbeRM:
    """``kind = "probe"``: a saved linear IRM (a directory with probe.json and probe.safetensors)."""
    return ProbeRM.load(path, device=device, name=name)
