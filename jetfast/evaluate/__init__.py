"""Evaluation of trained models and generated jets against real ones."""
