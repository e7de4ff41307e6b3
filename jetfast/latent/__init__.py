"""Latent bins and codes of a trained VAE run: the codes file format (:mod:`.codes`), the
run's encoder and what quantizing costs (:mod:`.encoder`), fitting the bins
(:mod:`.fit`, ``jetfast fit-bins``) and encoding every jet (:mod:`.encode`, ``jetfast encode``).

The K-Means that places the bins is :mod:`jetfast.bins`; the quantizer is :mod:`jetfast.ops`.
"""
