"""Hydra configs, shipped inside the wheel as the package ``clmerge.conf`` (pyproject.toml maps it here)."""
