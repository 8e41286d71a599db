"""The implicit reward model: log-ratio reward, word-level reconstruction with linear probes, comparison."""

from irm.implicit.logratio import LogRatioRM, response_logprobs, token_log_ratios
from irm.implicit.reconstruct import WordData, reconstruct, rescale, summarise
from irm.implicit.words import TEMPLATES, Triple, WordSplit, build_triples, word_logprobs, word_records

__all__ = ["LogRatioRM", "TEMPLATES", "Triple", "WordData", "WordSplit", "build_triples", "reconstruct",
           "rescale", "response_logprobs", "summarise", "token_log_ratios", "word_logprobs", "word_records"]
