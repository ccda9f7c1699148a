"""finetune.precision: `auto` follows the hardware's capability (mocked, not the math); unsupported
requests, bad accumulation and DDP without a launcher are one-line errors that write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, files_under
from test_cli import assert_one_line_error

from clmerge.errors import UserError
from clmerge.training import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("device", "native", "expected"), [
    (CPU, True, "bf16"), (CPU, False, "fp32"), (CUDA, True, "bf16"), (CUDA, False, "fp16")])
def test_auto_picks_bf16_where_native_else_fp16_on_gpus_else_fp32(monkeypatch: pytest.MonkeyPatch,
                                                                    device: torch.device, native: bool,
                                                                    expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: native)
    assert precision.resolve_precision("auto", device) == expected
    assert precision.resolve_precision("fp32", device) == "fp32"


def test_unsupported_requests_name_what_to_use_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: False)
    with pytest.raises(UserError, match="bf16 is not supported on this CPU.*finetune.precision=fp32"):
        precision.resolve_precision("bf16", CPU)
    with pytest.raises(UserError, match="bf16 is not supported on this GPU.*finetune.precision=fp16"):
        precision.resolve_precision("bf16", CUDA)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="valid: auto, fp32, bf16, fp16"):
        precision.resolve_precision("fp8", CPU)


def test_the_scaler_is_for_fp16_only() -> None:
    assert precision.grad_scaler("bf16", CPU) is None and precision.grad_scaler("fp32", CPU) is None
    assert isinstance(precision.grad_scaler("fp16", CPU), torch.amp.GradScaler)


@pytest.mark.parametrize(("args", "fragments"), [
    (["finetune.precision=bf16"], ["finetune.precision=bf16 is not supported on this CPU", "finetune.precision=fp32"]),
    (["finetune.precision=fp16"], ["fp16 needs a CUDA GPU", "finetune.precision=auto"]),
    (["finetune.accumulate=3"], ["finetune.batch_size=8 does not split into finetune.accumulate=3"]),
    (["finetune.optimizer_impl=fast"], ["unknown finetune.optimizer_impl 'fast'"]),
    (["finetune.distributed=on"], ["launcher environment is missing (RANK", "torchrun --nproc_per_node=N -m clmerge"]),
])
def test_bad_throughput_settings_are_one_line_exit_2_and_write_nothing(cli, paths, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        args: list[str], fragments: list[str]) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = cli("finetune", *TINY, *paths, *args)
    assert_one_line_error(result, *fragments)
    assert files_under(tmp_path) == []


def test_the_store_key_and_results_hold_the_resolved_precision(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from test_pipeline import tiny_cfg

    from clmerge.store import finetune_key

    cfg = tiny_cfg(tmp_path, precision="auto", device="cpu")
    explicit = {p: tiny_cfg(tmp_path, precision=p, device="cpu") for p in ("fp32", "bf16")}
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(precision, "native_bf16", lambda d: native)
        resolved = precision.with_precision(cfg, check=True)
        assert resolved.finetune.precision == expected  # what report.results_document records
        assert finetune_key(resolved) == finetune_key(explicit[expected])
    assert finetune_key(explicit["fp32"]) != finetune_key(explicit["bf16"])
