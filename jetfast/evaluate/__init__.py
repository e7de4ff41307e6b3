"""Evaluation of trained models and generated jets against real ones: the observables and
metrics (pure functions over arrays), the report of ``jetfast evaluate`` (:mod:`.report`, with
:mod:`.reader`, :mod:`.plots`, :mod:`.render`) and of ``jetfast evaluate-vae`` (:mod:`.vae`)."""
