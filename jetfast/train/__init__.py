"""Training: the shared run-directory utilities and one trainer per stage."""
