"""How services and workers start: modules run with `python -m infra.stack up` and the like
(`cifar-pipeline stack` calls the same code)."""
