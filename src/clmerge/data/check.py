"""`clmerge data check NAME`: validate a prepared dataset and count its classes and images."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clmerge.data.arrays import load_arrays
from clmerge.data.catalog import spec
from clmerge.data.filelist import read_filelist
from clmerge.data.images import open_rgb
from clmerge.errors import UserError


@dataclass(frozen=True)
class CountRow:
    """Images and classes with at least one image, in one split (and domain)."""

    split: str
    domain: str
    classes: int
    images: int


def check(name: str, data_root: Path, decode: bool = False) -> list[CountRow]:
    """Counts per split (and per split and domain); every listed image must exist (and decode, if asked)."""
    info = spec(name)
    rows = []
    if info.storage != "files":
        for split in ("train", "test"):
            _, labels, _ = load_arrays(info, data_root, split)
            rows.append(CountRow(split, "", len(np.unique(labels)), len(labels)))
        return rows
    listing = read_filelist(info, data_root)
    for split in listing.splits:
        entries = listing.entries(split)
        missing = [e.path for e in entries if not (listing.root / e.path).is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) of the {split} list are missing under {listing.root}, "
                            f"e.g. {missing[0]}; rerun `clmerge data prepare {name}`")
        if decode:
            for entry in entries:
                open_rgb(listing.root / entry.path)
        rows.append(CountRow(split, "", len({e.label for e in entries}), len(entries)))
        by_domain = Counter(e.domain for e in entries if e.domain)
        for domain in sorted(by_domain):
            labels = {e.label for e in entries if e.domain == domain}
            rows.append(CountRow(split, domain, len(labels), by_domain[domain]))
    return rows
