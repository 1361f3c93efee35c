"""Hydra launcher `grouped` (unipelt's default for `unipelt -m`): a sweep's runs are trained in groups."""
