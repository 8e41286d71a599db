"""Shared helpers that every other package may import and that import nothing of irm: names and
defaults (:mod:`.constants`), logging and progress bars (:mod:`.log`), atomic JSON writes, hashes,
plain-JSON conversion and secret redaction (:mod:`.io`), and CPU threads for two models side by side
(:mod:`.threads`)."""
