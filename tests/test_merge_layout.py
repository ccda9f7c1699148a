"""The engine's flat index: pieces and chunks cover every entry once, span reads equal per-tensor reads, and
merges cut into tiny chunks and task groups give the same bits as the default cut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clmerge.errors import UserError
from clmerge.merging import engine
from clmerge.merging.engine import merge_final, merge_steps
from clmerge.merging.layout import Layout
from clmerge.merging.methods import METHODS, MergeParams
from clmerge.merging.sources import open_sources

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPES = {"a": (3, 5), "b": (1,), "c": (4, 6), "d": (7,)}


def test_pieces_cover_a_range_across_tensors_in_order() -> None:
    layout = Layout(SHAPES)
    assert layout.total == 47 and layout.largest == 24
    pieces = layout.pieces(13, 30)  # the last 2 of a, all of b, all of c, 3 of d
    assert [(p.name, p.start, p.count, p.offset) for p in pieces] == [
        ("a", 13, 2, 0), ("b", 0, 1, 2), ("c", 0, 24, 3), ("d", 0, 3, 27)]


@pytest.mark.parametrize(("size", "within"), [(10, False), (10, True), (None, True), (100, False)])
def test_chunks_cover_every_entry_once(size: int | None, within: bool) -> None:
    layout = Layout(SHAPES)
    covered = []
    for begin, count in layout.chunks(size, within):
        assert count <= (size or layout.largest)
        pieces = layout.pieces(begin, count)
        assert sum(p.count for p in pieces) == count
        if within:
            assert len(pieces) == 1  # never crosses a tensor boundary
        covered.extend(range(begin, begin + count))
    assert covered == list(range(layout.total))


def test_span_reads_equal_the_tensors_whatever_lies_between_them(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(4, generator=g).bfloat16(),
               "c": torch.randn(24, generator=g), "d": torch.arange(6), "e": torch.randn(7, generator=g)}
    save_file(tensors, str(tmp_path / "v.safetensors"))
    floating = {k: v for k, v in tensors.items() if v.dtype.is_floating_point}
    for source in open_sources([tmp_path / "v.safetensors", floating]):
        layout = Layout({name: source.entries[name].shape for name in floating})
        flat = torch.cat([source.read(name).float().reshape(-1) for name in layout.names])
        for begin, count in [(0, layout.total), (13, 20), (17, 1), (40, 10)]:
            out = torch.full((count,), float("nan"))
            source.read_span(layout.pieces(begin, count), out)
            assert torch.equal(out, flat[begin:begin + count])
            spanned = source.span(layout.pieces(begin, count), torch.full((count,), float("nan")), hold=0)
            assert torch.equal(spanned, flat[begin:begin + count])


def test_span_gives_views_of_fp32_runs_that_stay_valid_after_their_pages_are_dropped(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3000), "b": torch.randn(50, 40), "c": torch.randn(7).bfloat16(), "d": torch.randn(9)}
    save_file(tensors, str(tmp_path / "v.safetensors"))
    file, memory = open_sources([tmp_path / "v.safetensors", {k: v for k, v in tensors.items() if k != "c"}])
    layout = Layout({name: tensors[name].shape for name in ("a", "b")})
    flat = torch.cat([tensors["a"], tensors["b"].reshape(-1)])
    views = []
    for begin in range(0, layout.total, 1000):  # hold 0: each span drops the pages of the one before
        out = torch.zeros(min(1000, layout.total - begin))
        views.append((begin, file.span(layout.pieces(begin, out.numel()), out, hold=0)))
        assert views[-1][1].data_ptr() != out.data_ptr()  # a view of the mapped file, not a copy
    for begin, view in views:
        assert torch.equal(view, flat[begin:begin + view.numel()])
    copied = torch.zeros(2000)
    assert memory.span(layout.pieces(3000, 2000), copied, hold=0).data_ptr() == copied.data_ptr()  # in memory: copies
    assert torch.equal(copied, tensors["b"].reshape(-1))
    crossing = Layout({name: tensors[name].shape for name in ("a", "c", "d")})  # bf16 between: read, not mapped
    out = torch.zeros(20)
    assert file.span(crossing.pieces(2995, 20), out, hold=0).data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.cat([tensors["a"][-5:], tensors["c"].float(), tensors["d"][:8]]))
    file.close()


def test_a_file_shorter_than_its_header_says_is_refused_when_opened(tmp_path: Path) -> None:
    save_file({"w": torch.randn(100)}, str(tmp_path / "v.safetensors"))
    (tmp_path / "v.safetensors").write_bytes((tmp_path / "v.safetensors").read_bytes()[:-8])
    with pytest.raises(UserError, match=r"v.safetensors is truncated \(tensor w\); rewrite it"):
        open_sources([tmp_path / "v.safetensors"])


def vectors(num_tasks: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"w": torch.randint(-5, 6, (9, 7), generator=g).float() / 4, "b": torch.randn(5, generator=g),
             "m": torch.randn(2, 13, generator=g)} for _ in range(num_tasks)]


@pytest.mark.parametrize("stored", [False, True], ids=["memory", "files"])
def test_tiny_chunks_and_task_groups_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        stored: bool) -> None:
    """Chunks of a few entries that cross tensors, and 7 tasks folded 3 at a time (groups of 3, 3, 1), from
    vectors in memory and from files (mapped views, pages dropped after every chunk)."""
    taus: list = vectors(7)
    params = MergeParams(seed=4, ties_k=0.4)
    default = {name: [{k: v.clone() for k, v in m.items()} for _, m in merge_steps(open_sources(taus), method,
                                                                                    params)]
               for name, method in METHODS.items()}
    if stored:
        for i, tau in enumerate(taus):
            save_file(tau, str(tmp_path / f"{i}.safetensors"))
        taus = sorted(tmp_path.glob("*.safetensors"))
        monkeypatch.setattr(engine, "MAPPED", 0)
    monkeypatch.setattr(engine, "ROWS", 12)  # 4 entries per row
    monkeypatch.setattr(engine, "GROUP", 3)
    monkeypatch.setattr(engine, "TASK_CHUNK", 10)
    for name, method in METHODS.items():
        final = merge_final(open_sources(taus), method, params)
        steps = [{k: v.clone() for k, v in m.items()} for _, m in merge_steps(open_sources(taus), method, params)]
        for a, b in zip(steps, default[name], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), name
        assert all(torch.equal(final[k], steps[-1][k]) for k in final), name


def test_a_bad_entry_in_a_later_task_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    taus = vectors(5)
    taus[4]["m"][1, 3] = float("nan")
    monkeypatch.setattr(engine, "GROUP", 2)
    for name in ("magmax", "random_mix", "last"):
        with pytest.raises(UserError, match=r"<task vector 5> has non-finite entries .* in m"):
            merge_final(open_sources(taus), METHODS[name])
