"""Read safetensors files, and check that task vectors agree.

The engine parses the header itself (8-byte little-endian length, JSON, then raw little-endian data), and
refuses a file shorter than its header says. It takes runs of fp32 tensors that lie end to end as views
of the mapped file (`span`: no copy; the fold reads the page cache in place, faster than copying it out
with `preadv`, docs/performance.md), and reads anything else (other dtypes, tensors out of order, a file
that cannot be mapped) with `preadv` into reusable buffers. The engine's files are the store's
hash-verified checkpoints, replaced only by rename, so a mapped file does not shrink under a merge.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from clmerge.errors import UserError
from clmerge.merging.layout import Piece
from clmerge.merging.memory import FOLIO

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data
    nbytes: int

    @property
    def numel(self) -> int:
        return self.nbytes // torch.empty(0, dtype=self.dtype).element_size()


class TensorFile:
    """An open safetensors file whose tensors are read on demand."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._handle = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise UserError(f"cannot open {self.path} ({exc.strerror}); check the path") from None
        self.entries = self._parse_header()
        self._mapping = self._map()
        self._held: Optional[tuple[int, int]] = None  # [first, end) bytes of the views given, not yet dropped

    def _map(self) -> Optional[mmap.mmap]:
        """The file mapped copy-on-write (never written; torch makes no tensor of a read-only buffer without a
        warning); None where it cannot be mapped, and everything is read with `preadv`."""
        try:
            return mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            return None

    def _parse_header(self) -> dict[str, Entry]:
        head = self._handle.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(self._handle.read(size)) if 0 < size < (1 << 30) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict):
            raise UserError(f"{self.path} is not a safetensors file; pass a file written by clmerge or safetensors")
        header.pop("__metadata__", None)
        entries, file_size = {}, os.fstat(self._handle.fileno()).st_size
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise UserError(f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            if 8 + size + end > file_size:
                raise UserError(f"{self.path} is truncated (tensor {name}); rewrite it")
            entries[name] = Entry(DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin)
        return dict(sorted(entries.items(), key=lambda item: item[1].start))  # file order: sequential reads

    def read_into(self, name: str, out: torch.Tensor, start: int = 0, count: int = -1) -> torch.Tensor:
        """Read entries [start, start + count) of tensor `name` (all: count < 0) into the contiguous buffer
        `out`; returns the filled view, shaped like the tensor when the whole tensor was read."""
        entry = self.entries[name]
        count = entry.numel - start if count < 0 else count
        view = out.view(-1)[:count]
        self._pread(_bytes(view), entry.start + start * view.element_size(), name)
        return view.view(entry.shape) if count == entry.numel else view

    def _pread(self, raw: memoryview, offset: int, name: str) -> None:
        """Fill the bytes `raw` with the file's bytes at `offset`."""
        done = 0
        while done < len(raw):  # Linux reads at most ~2 GB per call
            got = os.preadv(self._handle.fileno(), [raw[done:]], offset + done)
            if got <= 0:
                raise UserError(f"{self.path} is truncated (tensor {name}); rewrite it")
            done += got

    def read_span(self, pieces: list[Piece], out: torch.Tensor) -> None:
        """Tensor pieces into the flat fp32 `out`, each at its offset; fp32 pieces that lie end to end in the
        file are read with one call."""
        runs: list[list] = []  # [file offset, file end, first piece] of runs adjacent in the file and in `out`
        for piece in pieces:
            entry = self.entries[piece.name]
            if entry.dtype != torch.float32:
                target = torch.empty(piece.count, dtype=entry.dtype)
                read = self.read_into(piece.name, target, piece.start, piece.count)
                out[piece.offset:piece.offset + piece.count].copy_(read)
                continue
            start = entry.start + 4 * piece.start
            if runs and runs[-1][1] == start and runs[-1][2].offset + (start - runs[-1][0]) // 4 == piece.offset:
                runs[-1][1] += 4 * piece.count
            else:
                runs.append([start, start + 4 * piece.count, piece])
        if runs:
            raw = _bytes(out)  # one buffer object for all the runs
            for start, end, first in runs:
                self._pread(raw[4 * first.offset:4 * first.offset + end - start], start, first.name)

    def span(self, pieces: list[Piece], out: torch.Tensor, hold: int) -> torch.Tensor:
        """The pieces as one flat fp32 tensor: a view of the mapped file where they are fp32 and lie end to end,
        else read into `out` (`read_span`) and `out` itself. Views are for reading only.

        Once the views given since the last drop span `hold` bytes, their pages are dropped from this process
        (they stay in the page cache and fault back in if read again; about 30 us a call), with the folio in
        front of them that faulting them in mapped: a file keeps about `hold` plus a view and a folio mapped,
        not the vector."""
        begin = position = self.entries[pieces[0].name].start + 4 * pieces[0].start
        for piece in pieces:
            entry = self.entries[piece.name]
            if entry.dtype != torch.float32 or entry.start + 4 * piece.start != position:
                break
            position += 4 * piece.count
        else:
            if self._mapping is not None and begin % 4 == 0:  # fp32 at a 4-byte boundary
                if self._held is not None and self._held[1] - self._held[0] >= hold:
                    self.release()
                self._held = (begin, position) if self._held is None else (min(self._held[0], begin),
                                                                           max(self._held[1], position))
                # a tensor of its own over the bytes (storage offset 0: compiled kernels need no new variant)
                return torch.frombuffer(self._mapping, dtype=torch.float32, count=(position - begin) // 4,
                                        offset=begin)
        self.read_span(pieces, out)
        return out

    def release(self) -> None:
        """Drop the pages of the views given since the last drop from this process (madvise DONTNEED), from a
        folio before them: a fault maps a whole folio."""
        if self._held is not None and self._mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = max(0, self._held[0] - FOLIO) // mmap.PAGESIZE * mmap.PAGESIZE
            self._mapping.madvise(mmap.MADV_DONTNEED, start, self._held[1] - start)
        self._held = None

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` in a fresh buffer."""
        entry = self.entries[name]
        return self.read_into(name, torch.empty(entry.shape, dtype=entry.dtype))

    def close(self) -> None:
        """Close the file; the mapping goes with the last view of it."""
        self._mapping, self._held = None, None
        self._handle.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bytes(block: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(block.view(torch.uint8).numpy())


def check_compatible(files: list[TensorFile]) -> None:
    """One line naming the first key whose presence, shape or dtype differs, and the two files."""
    first = files[0]
    for other in files[1:]:
        for name in sorted(set(first.entries) | set(other.entries)):
            a, b = first.entries.get(name), other.entries.get(name)
            if a is None or b is None:
                holder, lacking = (first, other) if b is None else (other, first)
                raise UserError(f"tensor {name} is in {holder.path} but not in {lacking.path}; "
                                "the files come from different models")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise UserError(f"tensor {name} is {a.dtype}{list(a.shape)} in {first.path} but "
                                f"{b.dtype}{list(b.shape)} in {other.path}; the files come from different models")


def check_finite_tensor(tensor: torch.Tensor, where: str, name: str) -> None:
    """Refuse NaN/Inf (|NaN| >= x is false, so MagMax would drop it silently). One sum decides: a sum is
    finite only if every entry is; only when it is not does an exact check run (a finite overflow passes)."""
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise UserError(f"{where} has non-finite entries (NaN or inf) in {name}; re-run the fine-tuning that wrote it")
