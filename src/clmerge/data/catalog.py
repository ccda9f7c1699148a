"""The real datasets clmerge knows: where each lives under the data root, its label space and name rules.

Class names follow SPEC.md 4.6: the raw class labels stored with the data (folder names, meta names)
become prompt names by each dataset's rule. Layouts and prepare commands are documented in
docs/benchmarks.md; `clmerge data prepare NAME` writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from clmerge.data import reference
from clmerge.errors import UserError

NameRule = Callable[[Sequence[str]], list[str]]
DIGITS = tuple(str(d) for d in range(10))
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


def _as_is(raw: Sequence[str]) -> list[str]:
    return list(raw)


def _spaces(raw: Sequence[str]) -> list[str]:
    return [name.replace("_", " ") for name in raw]


def _cub(raw: Sequence[str]) -> list[str]:
    return [re.sub(r"^\d+\.", "", name).replace("_", " ") for name in raw]


def _sun397(raw: Sequence[str]) -> list[str]:
    return [name[2:].replace("_", " ") for name in raw]


def _gtsrb(raw: Sequence[str]) -> list[str]:
    names = reference.gtsrb_classnames()
    return [names[int(name)] for name in raw]


def _eurosat(raw: Sequence[str]) -> list[str]:
    mapping = reference.eurosat_classname_map()
    names = []
    for folder in raw:
        pretty = re.sub(r"(?<!^)(?=[A-Z])", " ", folder).lower()
        pretty = f"{pretty} area" if pretty.endswith("al") else pretty
        names.append(mapping.get(pretty, pretty))
    return names


@dataclass(frozen=True)
class DatasetSpec:
    """One real dataset: its directory under the data root, label space, storage and naming rule."""

    name: str  # the value of benchmark.dataset
    title: str
    reference: str  # the reference's name (template map, class and domain orders)
    directory: str  # below the data root
    num_classes: int
    storage: str  # "files" (clmerge.json + file lists) | "cifar" | "mnist" | "svhn" (torchvision formats)
    layout: str  # the prepared layout, in one line (for error messages)
    source: str  # what `data prepare --src` takes
    rule: NameRule = _as_is
    classes: Optional[tuple[str, ...]] = None  # raw class labels in label order, where they are fixed
    has_domains: bool = False

    def classnames(self, raw: Sequence[str]) -> list[str]:
        """Prompt names of the raw class labels (SPEC.md 4.6)."""
        return self.rule(raw)

    def domains(self) -> tuple[str, ...]:
        return reference.domains(self.reference) if self.has_domains else ()


_FILES = "clmerge.json + train.tsv/test.tsv file lists"
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python", 100, "cifar",
                "cifar-100-python/{train,test,meta} (torchvision's pickles)",
                "cifar-100-python.tar.gz, or a folder holding cifar-100-python/"),
    DatasetSpec("imagenet_r", "ImageNet-R", "ImageNetR", "imagenet-r", 200, "files", f"imagenet-r/{_FILES}",
                "the extracted imagenet-r/ (wnid or class-name folders, README.txt), or imagenet-r/{train,test}/",
                _spaces, reference.class_folders("ImageNetR"), has_domains=True),
    DatasetSpec("cub200", "CUB-200-2011", "CUB200", "cub200", 200, "files", f"cub200/{_FILES}",
                "the extracted CUB_200_2011/ (images/, images.txt, train_test_split.txt, ...)", _cub),
    DatasetSpec("cars", "Stanford Cars", "Cars", "stanford_cars", 196, "files", f"stanford_cars/{_FILES}",
                "stanford_cars/ with devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat", _spaces),
    DatasetSpec("domainnet", "DomainNet", "DomainNet", "domainnet", 345, "files", f"domainnet/{_FILES}",
                "the DomainNet folder: <domain>/<class>/ images and <domain>_{train,test}.txt lists",
                _spaces, reference.class_folders("DomainNet"), has_domains=True),
    DatasetSpec("mnist", "MNIST", "MNIST", "MNIST/raw", 10, "mnist",
                "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision)",
                "a folder with the four MNIST idx files (.gz or not)", classes=DIGITS),
    DatasetSpec("svhn", "SVHN", "SVHN", "svhn", 10, "svhn", "svhn/{train,test}_32x32.mat (torchvision)",
                "a folder with train_32x32.mat and test_32x32.mat", classes=DIGITS),
    DatasetSpec("eurosat", "EuroSAT", "EuroSAT", "eurosat", 10, "files", f"eurosat/{_FILES}",
                "EuroSAT RGB (2750/<Class>/ or <Class>/), or EuroSAT_Splitted/{train,val,test}/", _eurosat,
                EUROSAT_FOLDERS),
    DatasetSpec("gtsrb", "GTSRB", "GTSRB", "gtsrb", 43, "files", f"gtsrb/{_FILES}",
                "the GTSRB folder: GTSRB/{Final_Training/Images or Training}/, GTSRB/Final_Test/Images/, "
                "GT-final_test.csv", _gtsrb, tuple(f"{i:05d}" for i in range(43))),
    DatasetSpec("resisc45", "RESISC45", "RESISC45", "resisc45", 45, "files", f"resisc45/{_FILES}",
                "NWPU-RESISC45/<class>/, or resisc45/{train,val,test}/<class>/", _spaces),
    DatasetSpec("sun397", "SUN397", "SUN397", "sun397", 397, "files", f"sun397/{_FILES}",
                "the SUN397 folder (ClassName.txt, <l>/<class>/..., Partitions/) or SUN397/{train,test}/",
                _sun397),
    DatasetSpec("dtd", "DTD", "DTD", "dtd", 47, "files", f"dtd/{_FILES}",
                "the dtd/ folder (images/<class>/, labels/{train,val,test}1.txt) or dtd/{train,test}/"),
)}


def spec(name: str) -> DatasetSpec:
    """The spec of a real dataset; a one-line error for an unknown name."""
    if name not in SPECS:
        raise UserError(f"unknown dataset '{name}'; valid datasets: world, {', '.join(SPECS)}")
    return SPECS[name]
