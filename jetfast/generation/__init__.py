"""Generating jets: codes from the Transformer (:mod:`.sampler`, ``jetfast.sample``) and whole
files in the input layout from a trained run (:mod:`.writer`, ``jetfast generate``)."""
