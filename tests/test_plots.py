"""Report plots: written, non-empty PNGs of the expected pixel size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from clmerge.reporting import make_report
from test_report import ZERO, results, write


def test_plots_are_written_with_the_expected_size(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for alpha, rows in ((0.3, [[5, 1], [5, 5]]), (0.5, [[8, 1], [6, 9]]), (0.7, [[9, 0], [3, 9]])):
            write(runs / f"a{alpha}-s{seed}", results("cil", seed, {"zero_shot": (0.0, ZERO), "magmax": (alpha, rows)},
                                                      merge={"alpha": alpha}))
    curve = {"grid": [0.1, 0.5, 1.0], "accuracy": [0.4, 0.7, 0.6], "alpha": 0.5}
    (runs / "merge.json").write_text(json.dumps({"finetune": "/store/finetune/cil-key",
                                                 "methods": {"average": {"alpha": 0.5, "alpha_auto": curve}}}))
    written = make_report([runs], Console(quiet=True), out=tmp_path / "report", plots=True)
    plots = {p.relative_to(tmp_path / "report" / "plots").as_posix(): p for p in written if p.suffix == ".png"}
    assert sorted(plots) == ["alpha-auto/cil-key-average.png", "cil/accuracy-after-each-step.png",
                             "cil/heatmap-00-zero_shot-lambda0.png", "cil/heatmap-01-magmax-lambda0.3.png",
                             "cil/heatmap-02-magmax-lambda0.5.png", "cil/heatmap-03-magmax-lambda0.7.png",
                             "cil/lambda-magmax.png"]
    sizes = {"accuracy-after-each-step.png": (800, 500)}
    for name, path in plots.items():
        assert path.stat().st_size > 5000
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == sizes.get(Path(name).name, (640, 480))
            assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank


def test_plots_need_an_output_folder(cli, tmp_path: Path) -> None:
    write(tmp_path / "run", results("cil", 0, {"zero_shot": (0.0, ZERO)}))
    result = cli("report", str(tmp_path / "run"), "--plots")
    assert result.exit_code == 2 and "--out" in result.stderr
