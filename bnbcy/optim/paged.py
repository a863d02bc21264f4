"""Paged optimizer state (bitsandbytes' ``get_paged``, ``prefetch_tensor``, ``GlobalPageManager``).

A paged optimizer (``PagedAdamW8bit``, ``PagedLion``, ... or ``is_paged=True``) keeps
``state1``/``state2`` of every parameter with at least 1e5 elements in paged buffers:

* **On CUDA** a paged buffer is CUDA managed memory allocated by CuPy
  (``cupy.cuda.malloc_managed``), zero-filled on the host (so a new state occupies no
  device memory) and handed to torch without a copy: through DLPack where torch accepts
  CuPy's ``kDLCUDAManaged`` capsules, otherwise through the CUDA array interface (torch
  rejects that device type, pytorch/pytorch#96318); either way the tensor's pointer is the
  managed allocation, which :func:`get_paged` checks. The tensor is a ``cuda`` tensor, so
  torch's stream semantics cover reads of it (bitsandbytes hands out CPU tensors and must
  synchronise after every paged step; bnbcy does not).
* Before a parameter's update, :meth:`PageManager.prefetch` prefetches its states to the
  device on the current torch stream of that device, the stream the update kernel runs on
  (``cudaMemPrefetchAsync``). When the paged bytes resident on the device would exceed the
  device's budget (:meth:`PageManager.set_budget`; none by default, then only the driver
  evicts), the states prefetched least recently are advised to prefer host memory and
  prefetched back to the host (``cudaMemAdvise`` + ``cudaMemPrefetchAsync`` to
  ``cudaCpuDeviceId``) until the new ones fit, on the same stream, so eviction follows the
  kernels that used them. A parameter whose states alone exceed the budget is not
  prefetched at all: its kernel pages it in on demand.
* **On the CPU** (and under ``BNBCY_EMULATE_CUDA``, where parameters are CPU tensors) the
  same path runs with host memory: the same buffers are paged, registered, prefetched and
  evicted under the same budget and LRU rule; the prefetch and eviction themselves do
  nothing to the memory (there is only one), and :attr:`PageManager.stats` counts them.

Paged tensors carry ``is_paged = True`` and ``page_deviceid`` (the CUDA device, ``-1`` for
host backing) like bitsandbytes'. A state that was loaded with ``load_state_dict`` (or
otherwise replaced by an ordinary tensor) is copied back into a paged buffer at the next
step, so checkpoints stay plain tensors in bitsandbytes' format.
"""
from __future__ import annotations

import collections
import ctypes
import math
import warnings
import weakref

import torch

__all__ = ["PAGED_MIN_NUMEL", "PageManager", "get_paged", "prefetch_tensor", "state_buffer", "prefetch_state"]

PAGED_MIN_NUMEL = 100_000      # bitsandbytes pages state1/state2 of parameters from this size on
HOST_DEVICE = -1               # cudaCpuDeviceId: the page_deviceid of host-backed buffers
_PAGED_KEYS = ("state1", "state2")

# CUDA runtime enums (cuda_runtime_api.h); CuPy exposes most of them under the same names.
_ADVISE_PREFERRED_LOCATION = 3      # cudaMemAdviseSetPreferredLocation
_ADVISE_UNSET_PREFERRED = 4         # cudaMemAdviseUnsetPreferredLocation
_ATTR_CONCURRENT_MANAGED = 89       # cudaDevAttrConcurrentManagedAccess
_MEMORY_TYPE_MANAGED = 3            # cudaMemoryTypeManaged


# --------------------------------------------------------------------------- backings
class _HostBacking:
    """Host memory: the CPU and emulated path. Moving pages is a no-op (one memory)."""

    name = "host"

    def alloc(self, nbytes, device_index):
        return torch.zeros(nbytes, dtype=torch.uint8)

    def to_device(self, t, device_index, stream):
        pass

    def to_host(self, t, stream):
        pass


class _ManagedBacking:
    """CUDA managed memory from CuPy, shared with torch without a copy."""

    name = "managed"

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.rt = cupy.cuda.runtime
        self._concurrent = {}
        self._advice_failed = False

    def concurrent(self, device_index):
        """Whether host and device may touch managed memory at once (needed for prefetching)."""
        hit = self._concurrent.get(device_index)
        if hit is None:
            attr = getattr(self.rt, "cudaDevAttrConcurrentManagedAccess", _ATTR_CONCURRENT_MANAGED)
            hit = self._concurrent[device_index] = bool(self.rt.deviceGetAttribute(attr, device_index))
        return hit

    def alloc(self, nbytes, device_index):
        cp = self.cupy
        with cp.cuda.Device(device_index):
            mem = cp.cuda.malloc_managed(nbytes)
            arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=mem)
            if not self.concurrent(device_index):
                cp.cuda.Device(device_index).synchronize()   # host access needs an idle device here
            # zero on the host: the new state's pages start in host memory, not on the device
            ctypes.memset(mem.ptr, 0, nbytes)
            t = _managed_to_torch(arr, device_index)
        if t.data_ptr() != mem.ptr:
            raise RuntimeError("bnbcy: torch copied the managed allocation instead of sharing it")
        return t

    def _move(self, t, target, stream):
        if self.concurrent(t.page_deviceid):
            self.rt.memPrefetchAsync(t.data_ptr(), t.untyped_storage().nbytes(), target, stream)

    def _advise(self, t, advice, device):
        # a hint, not the mechanism (the prefetches move the pages): a runtime that rejects it
        # is reported once and paging goes on with prefetches alone
        if self._advice_failed:
            return
        try:
            self.rt.memAdvise(t.data_ptr(), t.untyped_storage().nbytes(), advice, device)
        except Exception as exc:  # CUDARuntimeError, or a CuPy without this entry point
            self._advice_failed = True
            warnings.warn(f"bnbcy paged optimizer: cudaMemAdvise failed ({exc}); paging with prefetches only",
                          RuntimeWarning, stacklevel=3)

    def to_device(self, t, device_index, stream):
        self._advise(t, _ADVISE_UNSET_PREFERRED, device_index)
        self._move(t, device_index, stream)

    def to_host(self, t, stream):
        self._advise(t, _ADVISE_PREFERRED_LOCATION, HOST_DEVICE)
        self._move(t, HOST_DEVICE, stream)


def _managed_to_torch(arr, device_index):
    """``arr`` (CuPy, managed memory) as a torch CUDA tensor on the same memory."""
    try:
        return torch.from_dlpack(arr)
    except (RuntimeError, BufferError, TypeError):   # kDLCUDAManaged unsupported by this torch
        return torch.as_tensor(arr, device=torch.device("cuda", device_index))


_backings = {}


def _backing(device):
    kind = "managed" if device.type == "cuda" else "host"
    b = _backings.get(kind)
    if b is None:
        if kind == "managed":
            try:
                b = _ManagedBacking()
            except ImportError as exc:
                raise ImportError("paged optimizer state on CUDA needs CuPy (pip install bnbcy[cuda12] or "
                                  "bnbcy[cuda13])") from exc
        else:
            b = _HostBacking()
        _backings[kind] = b
    return b


def _device_index(device):
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    if device.type == "cpu":
        return HOST_DEVICE
    raise NotImplementedError(f"paged optimizer state is implemented for CPU and CUDA tensors, not {device.type}")


def _stream(device_index):
    """The current torch stream of a CUDA device (0 for host backing)."""
    if device_index == HOST_DEVICE:
        return 0
    return torch.cuda.current_stream(device_index).cuda_stream


# --------------------------------------------------------------------------- the manager
class PageManager:
    """Process-wide registry of paged tensors and of what is resident on each device.

    bitsandbytes' ``GlobalPageManager`` (``get_instance``, ``paged_tensors``,
    ``prefetch_all``), plus a per-device budget with least-recently-prefetched eviction.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    @classmethod
    def get_instance(cls):
        """Return the singleton, creating it on first use."""
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def initialize(self):
        """Forget every registration, budget and counter (paged tensors stay valid)."""
        self._tensors = collections.OrderedDict()            # id -> weak reference, allocation order
        self._resident = collections.defaultdict(collections.OrderedDict)  # device -> id -> (ref, nbytes)
        self._budget = {}
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ registry
    @property
    def paged_tensors(self):
        """The live paged tensors, in allocation order."""
        live = [(k, r()) for k, r in self._tensors.items()]
        for k, t in live:
            if t is None:
                del self._tensors[k]
        return [t for _, t in live if t is not None]

    def register(self, t):
        """Track a paged tensor (done by :func:`get_paged`)."""
        self._tensors[id(t)] = weakref.ref(t)

    def owns(self, t):
        """Whether ``t`` is a live paged buffer of this manager. A tensor's ``is_paged`` attribute
        alone does not say so: ``torch.save``/``torch.load`` and ``deepcopy`` keep it on copies."""
        ref = self._tensors.get(id(t))
        return ref is not None and ref() is t

    # ------------------------------------------------------------------ budget
    def set_budget(self, nbytes, device=None):
        """Limit the paged bytes bnbcy keeps prefetched on a device.

        Parameters
        ----------
        nbytes : int or None
            Budget in bytes; ``None`` removes it (then only the driver evicts, under real
            memory pressure).
        device : torch.device or str or int, optional
            The CUDA device (index or name), or ``"cpu"`` for the host-backed path; default
            the current CUDA device when CUDA is available, else ``"cpu"``.
        """
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
            raise ValueError(f"page budget must be a non-negative int of bytes or None, got {nbytes!r}")
        key = self._key(device)
        if nbytes is None:
            self._budget.pop(key, None)
        else:
            self._budget[key] = nbytes

    def budget(self, device=None):
        """The budget of a device in bytes, or None."""
        return self._budget.get(self._key(device))

    def resident_bytes(self, device=None):
        """Paged bytes bnbcy has prefetched to a device and not evicted since."""
        res = self._resident[self._key(device)]
        return sum(n for ref, n in res.values() if ref() is not None)

    @staticmethod
    def _key(device):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(device, int):
            return device
        return _device_index(torch.device(device))

    # ------------------------------------------------------------------ moving pages
    def prefetch(self, tensors):
        """Prefetch paged tensors used together (one parameter's states) to their device.

        Evicts the least recently prefetched other tensors of that device while the budget
        would be exceeded; prefetches nothing when ``tensors`` alone exceed it.
        """
        tensors = [t for t in tensors if t is not None and self.owns(t)]
        if not tensors:
            return
        dev = tensors[0].page_deviceid
        res = self._resident[dev]
        for key in [k for k, (ref, _) in res.items() if ref() is None]:
            del res[key]
        mine = {id(t) for t in tensors}
        need = sum(_nbytes(t) for t in tensors if id(t) not in res)
        budget = self._budget.get(dev)
        if budget is not None:
            if sum(_nbytes(t) for t in tensors) > budget:
                self.stats["over_budget"] += 1
                return
            held = sum(n for _, n in res.values())
            for key in list(res):
                if held + need <= budget:
                    break
                if key in mine:
                    continue
                ref, n = res.pop(key)
                self._evict(ref(), n)
                held -= n
        stream = _stream(dev)
        for t in tensors:
            key = id(t)
            if key in res:
                res.move_to_end(key)
                continue
            _backing_of(t).to_device(t, dev, stream)
            res[key] = (weakref.ref(t), _nbytes(t))
            self.stats["prefetches"] += 1
            self.stats["prefetched_bytes"] += _nbytes(t)

    def _evict(self, t, nbytes):
        _backing_of(t).to_host(t, _stream(t.page_deviceid))
        self.stats["evictions"] += 1
        self.stats["evicted_bytes"] += nbytes

    def prefetch_all(self, to_cpu=False):
        """Prefetch every paged tensor to its device, or evict all of them to the host.

        As in bitsandbytes, the tensors allocated first are moved last (they are used first
        and should be the last to be evicted again).
        """
        for t in self.paged_tensors[::-1]:
            prefetch_tensor(t, to_cpu)


def _nbytes(t):
    return t.numel() * t.element_size()


def _backing_of(t):
    return _backing(torch.device("cpu") if t.page_deviceid == HOST_DEVICE else torch.device("cuda", t.page_deviceid))


# --------------------------------------------------------------------------- bitsandbytes' functions
def get_paged(*shape, dtype=torch.float32, device=None):
    """A zero-filled paged tensor (bitsandbytes' ``functional.get_paged``).

    Parameters
    ----------
    *shape : int
        Shape of the tensor.
    dtype : torch.dtype, default torch.float32
    device : torch.device or str, optional
        ``"cuda[:N]"`` for CUDA managed memory (default: the first CUDA device when CUDA is
        available), ``"cpu"`` for host backing.

    Returns
    -------
    torch.Tensor
        With ``is_paged = True`` and ``page_deviceid``; registered with :class:`PageManager`.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"get_paged: shape must be non-negative ints, got {shape!r}")
    if not isinstance(dtype, torch.dtype) or dtype.is_complex:
        raise TypeError(f"get_paged: dtype must be a real torch.dtype, got {dtype!r}")
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    index = _device_index(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    raw = _backing(device).alloc(max(nbytes, itemsize), index)   # never a zero-byte allocation
    t = raw[:nbytes].view(dtype).view(shape)
    t.is_paged = True
    t.page_deviceid = index
    PageManager.get_instance().register(t)
    return t


def prefetch_tensor(A, to_cpu=False):
    """Prefetch a paged tensor to its device (or to the host with ``to_cpu``), on the
    current stream of its device; bitsandbytes' ``functional.prefetch_tensor``.

    Budget bookkeeping is left to :meth:`PageManager.prefetch`; this moves exactly ``A``.
    """
    mgr = PageManager.get_instance()
    if not mgr.owns(A):
        raise ValueError("prefetch_tensor: only paged tensors (from get_paged / a Paged optimizer) can be "
                         "prefetched")
    res = mgr._resident[A.page_deviceid]
    if to_cpu:
        entry = res.pop(id(A), None)
        mgr._evict(A, _nbytes(A) if entry is None else entry[1])
    else:
        _backing_of(A).to_device(A, A.page_deviceid, _stream(A.page_deviceid))
        res[id(A)] = (weakref.ref(A), _nbytes(A))
        res.move_to_end(id(A))
        mgr.stats["prefetches"] += 1
        mgr.stats["prefetched_bytes"] += _nbytes(A)


# --------------------------------------------------------------------------- the optimizer's hooks
def state_buffer(p, shape, dtype):
    """A zero-filled paged state buffer for parameter ``p`` (the paged branch of
    ``Optimizer8bit.get_state_buffer``)."""
    return get_paged(*shape, dtype=dtype, device=p.device)


def pageable(p):
    """Whether the states of ``p`` are paged in a paged optimizer (bitsandbytes' size rule)."""
    return p.numel() >= PAGED_MIN_NUMEL


def prefetch_state(optimizer, p):
    """Before ``p``'s update: page its ordinary ``state1``/``state2`` again (after a
    ``load_state_dict``), then prefetch them to the device within the budget."""
    if not optimizer.is_paged or not pageable(p):
        return
    state = optimizer.state[p]
    mgr = PageManager.get_instance()
    fresh = {}
    for key in _PAGED_KEYS:
        t = state.get(key)
        if isinstance(t, torch.Tensor) and not mgr.owns(t):
            buf = get_paged(*t.shape, dtype=t.dtype, device=p.device)
            buf.copy_(t)
            fresh[key] = buf
    state.update(fresh)                     # only once every copy succeeded
    mgr.prefetch([state.get(k) for k in _PAGED_KEYS])
