"""Activations: capture through TransformerLens hooks (:mod:`.capture`) into a sharded, resumable
on-disk store (:mod:`.store`), data-parallel across ranks (:mod:`.distributed`), and the ``capture``
pipeline stage (:mod:`.stage`)."""
