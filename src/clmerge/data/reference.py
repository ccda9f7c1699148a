"""The reference lists (SPEC.md section 4): class and domain orders, prompt templates, special class names.

They ship as ``reference_lists.json``, a copy of ``shared/reference/magmax_data_lists.json`` (data taken
from the MagMax reference repository); this module is the only reader.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Optional

from clmerge.errors import UserError


@lru_cache(maxsize=1)
def _lists() -> dict[str, Any]:
    return json.loads((resources.files("clmerge.data") / "reference_lists.json").read_text())


def template_sets() -> dict[str, list[str]]:
    """Every template set by key ('imagenet', 'cifar100', ...); templates hold the placeholder {c}."""
    return _lists()["templates(placeholder {c})"]


def templates(key: str) -> tuple[str, ...]:
    """The template set `key`."""
    sets = template_sets()
    if key not in sets:
        raise UserError(f"unknown template set '{key}'; valid: default, {', '.join(sorted(sets))}")
    return tuple(sets[key])


def template_key(reference_name: str) -> str:
    """The template set the reference uses for a dataset (its `dataset_to_template` map)."""
    return _lists()["dataset_to_template"][reference_name]


def class_order(reference_name: str) -> Optional[list[int]]:
    """The reference class order of a dataset, or None where it has none (natural order)."""
    order = _lists().get(f"{reference_name}.default_class_order")
    return order if isinstance(order, list) else None


def domains(reference_name: str) -> tuple[str, ...]:
    """A dataset's domains in the reference's index order (ImageNetR, DomainNet)."""
    return tuple(_lists()[f"{reference_name}.DOMAINS"])


def domain_order(reference_name: str) -> list[str]:
    """The reference domain sequence of a domain-incremental benchmark."""
    names = domains(reference_name)
    return [names[i] for i in _lists()[f"{reference_name}.default_domain_order"]]


def class_folders(reference_name: str) -> Optional[tuple[str, ...]]:
    """The reference's sorted class-folder names (ImageNetR, DomainNet), or None."""
    names = _lists().get(f"{reference_name}.CLASSES(folder names, sorted)")
    return tuple(names) if names else None


def gtsrb_classnames() -> tuple[str, ...]:
    """The 43 GTSRB prompt names, by class index."""
    return tuple(_lists()["GTSRB.classnames"])


def eurosat_classname_map() -> dict[str, str]:
    """EuroSAT: prettified folder name -> prompt name."""
    return dict(_lists()["EuroSAT.classname_map(prettified folder name -> prompt name)"])


def eight_datasets() -> tuple[list[str], dict[str, int]]:
    """The eight-dataset sequence: reference dataset names in order, and epochs per dataset."""
    return list(_lists()["8datasets.order"]), dict(_lists()["8datasets.epochs"])
