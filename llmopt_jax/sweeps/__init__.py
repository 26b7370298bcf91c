"""Sweeps on Optuna: search spaces over any config, shared studies, trials as runs, reports."""
