"""Tensors handed between processes in one POSIX shared-memory block each, never copied into a message.

Ownership, so that nothing is left in /dev/shm whichever side dies:

- The worker creates the block (`share_tensors`), its pages reserved up front (a full /dev/shm is a
  `SharedMemoryFull` error then, not a SIGBUS on the first write), and registers it with
  multiprocessing's resource tracker, which unlinks whatever is still registered when it exits.
- The engine reads: `open_tensors` attaches, unlinks the name at once (the worker may have died since
  it sent the request: its block must not outlive the request), copies the tensors out (to the device
  they go to anyway) and closes the mapping before it returns. It must open a request's tensors before
  it sends that request's first `Tokens`. If the block is already gone (the worker gave up first),
  `open_tensors` raises `TensorsGone`.
- The worker releases its hold (`SharedTensors.release`) when the engine's first `Tokens` of that
  request arrives (any, a failure's too), or when it gives the request up (abort, timeout, the engine
  gone): it unlinks the block if the engine has not, and unregisters it either way.
- Only a worker killed between making a block and sending its request leaves one behind, until the
  resource tracker (the gunicorn master's, which forked workers share) exits with the server.
"""

from __future__ import annotations

# The stdlib's shm_open, which SharedMemory uses too (open_tensors says why it is called directly).
import _posixshmem  # type: ignore[import-not-found]
import mmap
import os
import secrets
from collections.abc import Mapping
from multiprocessing import resource_tracker, shared_memory

import torch

from glmvision.backends.engine.wire import DType, TensorRef

ALIGN = 64  # a cache line: every tensor starts aligned for any dtype and for vector loads
PREFIX = "glmv_"  # names in /dev/shm say whose they are

_DTYPES: dict[DType, torch.dtype] = {
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# How a dtype's bytes are read from a buffer: bfloat16 as the 16-bit integers it is stored in.
_STORED = {**{name: dtype for name, dtype in _DTYPES.items()}, "bfloat16": torch.uint16}


class TensorsGone(LookupError):
    """A request's block no longer exists: its worker gave the request up."""


class SharedMemoryFull(OSError):
    """/dev/shm has no room for a request's tensors (a container's default is 64 MiB)."""


class SharedTensors:
    """The worker's hold on one block: `release` closes and unlinks it (once; later calls do nothing)."""

    def __init__(self, block: shared_memory.SharedMemory | None) -> None:
        self._block = block

    @property
    def name(self) -> str | None:
        return None if self._block is None else self._block.name

    def release(self) -> None:
        """Close and unlink the block (idempotent)."""
        block, self._block = self._block, None
        if block is None:
            return
        block.close()
        try:
            block.unlink()  # also unregisters it from the resource tracker
        except FileNotFoundError:
            resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]

    def __enter__(self) -> SharedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _view(buffer: memoryview, offset: int, dtype: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buffer`'s bytes at `offset` (no copy)."""
    count = 1
    for size in shape:
        count *= size
    if not count:  # frombuffer refuses a count of 0
        return torch.empty(shape, dtype=_DTYPES[dtype])
    flat = torch.frombuffer(buffer, dtype=_STORED[dtype], count=count, offset=offset)
    return flat.view(_DTYPES[dtype]).reshape(shape)


def share_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[SharedTensors, tuple[TensorRef, ...]]:
    """Copy `tensors` into one new block; the caller owns it (see the module's rule) and sends the refs."""
    layout: list[tuple[str, torch.Tensor, int, DType]] = []
    size = 0
    for name, tensor in tensors.items():
        dtype = _NAMES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire does not carry")
        size = -(-size // ALIGN) * ALIGN
        layout.append((name, tensor, size, dtype))
        size += tensor.numel() * tensor.element_size()
    if not layout:
        return SharedTensors(None), ()
    block = shared_memory.SharedMemory(name=PREFIX + secrets.token_hex(12), create=True, size=max(size, 1))
    buffer = block.buf
    assert buffer is not None  # a block just made is open
    try:
        try:
            # tmpfs allocates pages on first write, and a write past its room is a SIGBUS that kills
            # the worker: reserve them now, so that a full /dev/shm is an error this request gets.
            os.posix_fallocate(block._fd, 0, max(size, 1))  # type: ignore[attr-defined]
        except OSError as exc:
            raise SharedMemoryFull(
                exc.errno, f"/dev/shm has no room for {size} bytes of tensors ({exc.strerror})"
            ) from None
        refs = []
        for name, tensor, offset, dtype in layout:
            shape = tuple(tensor.shape)
            if tensor.numel():
                _view(buffer, offset, dtype, shape).copy_(tensor)
            refs.append(TensorRef(name, block.name, offset, dtype, shape))
    except BaseException:
        SharedTensors(block).release()
        raise
    return SharedTensors(block), tuple(refs)


def open_tensors(refs: tuple[TensorRef, ...], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Copies of the tensors `refs` name, on `device`; the block is unlinked and closed on return."""
    if not refs:
        return {}
    names = {ref.block for ref in refs}
    if len(names) != 1:
        raise ValueError(f"tensors of one request lie in one block, not {len(names)}")
    name = "/" + names.pop()
    try:
        fd = _posixshmem.shm_open(name, os.O_RDONLY)
    except FileNotFoundError:
        raise TensorsGone(f"shared-memory block {refs[0].block!r} is gone") from None
    try:
        _posixshmem.shm_unlink(name)  # the open descriptor keeps it readable; see the module's rule
    except FileNotFoundError:
        pass  # its worker released it meanwhile
    # Not SharedMemory(name=...): before Python 3.13 it registers an attached block with the resource
    # tracker, which would unlink it when this process exits, and which a spawned engine shares with
    # the worker that spawned it (its unregister would undo the worker's registration).
    try:
        size = os.fstat(fd).st_size
        # Copy-on-write: a writable mapping for torch.frombuffer, whose writes (none) stay private.
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
    finally:
        os.close(fd)
    if mapping is None:
        raise ValueError(f"shared-memory block {refs[0].block!r} is empty")
    try:
        out: dict[str, torch.Tensor] = {}
        buffer = memoryview(mapping)
        for ref in refs:
            view = _view(buffer, ref.offset, ref.dtype, ref.shape)
            end = ref.offset + view.numel() * view.element_size()
            if end > size:
                raise ValueError(f"tensor {ref.name!r} reaches byte {end} of a {size}-byte block")
            # A copy, never the view: a view pins the mapping (close() refuses while one lives) and would
            # read whatever the worker writes next; the copy is the device transfer the model needs anyway.
            out[ref.name] = view.to(device, copy=True)
            del view
        buffer.release()
        return out
    finally:
        try:
            mapping.close()
        except BufferError:  # a view still held by an exception's frames: the mapping goes with it
            pass
