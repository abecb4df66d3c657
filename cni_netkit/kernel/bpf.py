"""A small ctypes binding to the system libbpf (``libbpf.so.1``): objects, maps, pins, XDP links.

The XDP program is C compiled by clang and loaded with libbpf, the way
Cilium and xdp-tools do it, rather than bytecode assembled here. This
module binds only what ``kernel.xsk`` uses and is the only place that
touches libbpf. Its callers are inside ``cni_netkit.kernel``: file
descriptors are plain ints the caller owns and closes, and nothing of
libbpf (pointers, objects) leaves this module except ``BpfObject``, which
``kernel.xsk`` closes before it returns.

libbpf >= 1.0 reports failures as ``-errno`` (and NULL plus ``errno`` for
pointers); they become our ``KernelError`` subclasses with the errno kept,
and libbpf's own messages (e.g. the verifier's) in ``details``.

Struct layouts are the prefixes of the uapi (``linux/bpf.h``) and libbpf
1.1 (``bpf/bpf.h``, ``bpf/libbpf.h``) ones this code needs: the kernel and
libbpf both accept a shorter struct than their own (its ``sz`` or info
length says how much is there), so a newer system libbpf works unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from cni_netkit.errors import KernelError, KernelUnsupported, kernel_error

LIBBPF = "libbpf.so.1"

# enum bpf_map_type, enum bpf_attach_type (uapi linux/bpf.h)
BPF_MAP_TYPE_XSKMAP = 17
BPF_XDP = 37
# map update flags; BPF_F_REPLACE for BPF_LINK_UPDATE: fail unless the old program matches
BPF_ANY = 0
BPF_F_REPLACE = 1 << 2
# BPF_PROG_TEST_RUN flags
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
# XDP attach modes (uapi linux/if_link.h): flags for attaching, and what bpf_xdp_query reports
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2
_LIBBPF_DEBUG = 2

_u32 = ctypes.c_uint32


class _LinkCreateOpts(ctypes.Structure):
    _fields_ = (("sz", ctypes.c_size_t), ("flags", _u32))


class _LinkUpdateOpts(ctypes.Structure):
    _fields_ = (("sz", ctypes.c_size_t), ("flags", _u32), ("old_prog_fd", _u32))


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("prog_id", _u32),
        ("drv_prog_id", _u32),
        ("hw_prog_id", _u32),
        ("skb_prog_id", _u32),
        ("attach_mode", ctypes.c_uint8),
    )


class _TestRunOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("retval", _u32),
        ("repeat", ctypes.c_int),
        ("duration", _u32),  # out: mean ns per run of the program over ``repeat`` runs
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    )


class _XdpMd(ctypes.Structure):
    """``struct xdp_md``: the XDP program's context, as BPF_PROG_TEST_RUN takes it."""

    _fields_ = (
        ("data", _u32),
        ("data_end", _u32),
        ("data_meta", _u32),
        ("ingress_ifindex", _u32),
        ("rx_queue_index", _u32),
        ("egress_ifindex", _u32),
    )


class _ProgInfo(ctypes.Structure):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _MapInfo(ctypes.Structure):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * 16),
    )


class _LinkInfo(ctypes.Structure):
    # the union after prog_id is 8-byte aligned; for XDP links it starts with the ifindex
    _fields_ = (("type", _u32), ("id", _u32), ("prog_id", _u32), ("_pad", _u32), ("ifindex", _u32))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    tag: str  # hex of the kernel's hash of the instructions: equal code, equal tag
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    ifindex: int  # XDP links: 0 once the device is gone (the link is then defunct)


@dataclass(frozen=True)
class XdpQuery:
    """``bpf_xdp_query``: what is attached to a device, per mode."""

    prog_id: int
    drv_prog_id: int
    skb_prog_id: int
    hw_prog_id: int


_PrintFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Capture(threading.local):
    """libbpf's messages for the call in progress on this thread; None: dropped.

    libbpf's default printer writes warnings to stderr, where a CNI runtime
    shows them as noise; errors carry them in ``details`` instead. libbpf
    calls the printer on the thread that called it, and the node agent may
    serve requests on several threads: hence one list per thread.
    """

    messages: list[str] | None = None


_capture_state = _Capture()


def _on_libbpf_message(level: int, fmt: bytes | None, args: int | None) -> int:
    captured = _capture_state.messages
    if captured is None or level == _LIBBPF_DEBUG or fmt is None:
        return 0
    buf = ctypes.create_string_buffer(1024)
    # va_list is passed on as an opaque pointer: what x86-64 and arm64 pass it as
    _libc().vsnprintf(buf, len(buf), fmt, args)
    captured.append(buf.value.decode(errors="replace").rstrip())
    return 0


_print_fn = _PrintFn(_on_libbpf_message)  # a module global: libbpf keeps the pointer


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
    libc.vsnprintf.restype = ctypes.c_int
    return libc


# name -> (restype, argtypes) of every libbpf function used
_int, _ptr, _str, _voidp = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p
_SIGNATURES: dict[str, tuple[object, tuple[object, ...]]] = {
    "libbpf_set_print": (_ptr, (_PrintFn,)),
    "bpf_object__open_file": (_ptr, (_str, _ptr)),
    "bpf_object__load": (_int, (_ptr,)),
    "bpf_object__close": (None, (_ptr,)),
    "bpf_object__find_map_by_name": (_ptr, (_ptr, _str)),
    "bpf_object__find_program_by_name": (_ptr, (_ptr, _str)),
    "bpf_map__set_pin_path": (_int, (_ptr, _str)),
    "bpf_program__fd": (_int, (_ptr,)),
    "bpf_map__fd": (_int, (_ptr,)),
    "bpf_map_create": (_int, (_int, _str, _u32, _u32, _u32, _ptr)),
    "bpf_map_update_elem": (_int, (_int, _voidp, _voidp, ctypes.c_uint64)),
    "bpf_map_lookup_elem": (_int, (_int, _voidp, _voidp)),
    "bpf_map_delete_elem": (_int, (_int, _voidp)),
    "bpf_obj_pin": (_int, (_int, _str)),
    "bpf_obj_get": (_int, (_str,)),
    "bpf_obj_get_info_by_fd": (_int, (_int, _voidp, ctypes.POINTER(_u32))),
    "bpf_prog_get_fd_by_id": (_int, (_u32,)),
    "bpf_link_create": (_int, (_int, _int, _int, ctypes.POINTER(_LinkCreateOpts))),
    "bpf_link_update": (_int, (_int, _int, ctypes.POINTER(_LinkUpdateOpts))),
    "bpf_xdp_query": (_int, (_int, _int, ctypes.POINTER(_XdpQueryOpts))),
    "bpf_prog_test_run_opts": (_int, (_int, ctypes.POINTER(_TestRunOpts))),
}


@functools.cache
def _lib() -> ctypes.CDLL:
    """libbpf, loaded on first use: the plugin pays for it only when it needs a BPF call."""
    try:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as e:
        raise KernelUnsupported(
            f"{LIBBPF} not found: AF_XDP steering needs the system libbpf",
            f"install libbpf1 (Debian, Ubuntu) or libbpf (Fedora, RHEL): {e}",
            err=errno.ENOENT,
        ) from e
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    lib.libbpf_set_print(_print_fn)
    return lib


@contextmanager
def _capture() -> Iterator[list[str]]:
    """Collect libbpf's warnings while a call runs (for an error's details)."""
    outer = _capture_state.messages
    messages: list[str] = []
    _capture_state.messages = messages
    try:
        yield messages
    finally:
        _capture_state.messages = outer


def _check(ret: int, what: str, messages: list[str] | None = None) -> int:
    """``ret`` when it is not a libbpf error (``-errno``), else our KernelError for it."""
    if ret >= 0:
        return ret
    raise kernel_error(-ret, what, "; ".join(messages or ()))


def _check_ptr(ptr: int | None, what: str, messages: list[str] | None = None) -> int:
    if ptr:
        return ptr
    err = ctypes.get_errno() or errno.EINVAL
    raise kernel_error(err, what, "; ".join(messages or ()))


# --- objects --------------------------------------------------------------------------


class BpfObject:
    """An ELF BPF object opened with libbpf: pin maps, load, then take program fds.

    Close it (``with``) once done: the loaded program and maps stay alive as
    long as something holds them (an fd the caller dup'ed, a pin, a link).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with _capture() as messages:
            self._obj = _check_ptr(
                _lib().bpf_object__open_file(path.encode(), None), f"open BPF object {path}",
                messages,
            )

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._obj:
            _lib().bpf_object__close(self._obj)
            self._obj = 0

    def _map(self, name: str) -> int:
        ptr = _lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if not ptr:
            raise KernelError(f"BPF object {self.path} has no map {name!r}", err=errno.ENOENT)
        return int(ptr)

    def pin_map(self, name: str, path: str) -> None:
        """Reuse the map pinned at ``path`` on load, or create and pin it there.

        libbpf refuses (EINVAL at load) a pinned map whose definition differs.
        """
        _check(_lib().bpf_map__set_pin_path(self._map(name), path.encode()),
               f"set pin path {path} of map {name}")

    def map_fd(self, name: str) -> int:
        """The loaded map's fd, dup'ed: the caller owns (and closes) it."""
        return os.dup(_check(_lib().bpf_map__fd(self._map(name)), f"fd of map {name}"))

    def load(self) -> None:
        with _capture() as messages:
            _check(_lib().bpf_object__load(self._obj), f"load BPF object {self.path}", messages)

    def prog_fd(self, name: str) -> int:
        """The loaded program's fd, dup'ed: the caller owns (and closes) it."""
        ptr = _lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if not ptr:
            raise KernelError(f"BPF object {self.path} has no program {name!r}", err=errno.ENOENT)
        return os.dup(_check(_lib().bpf_program__fd(ptr), f"fd of program {name}"))


# --- maps and pins --------------------------------------------------------------------


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int
               ) -> int:
    """A new map's fd (the caller closes it); no options, so libbpf gets none (NULL)."""
    return _check(
        _lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
        f"create BPF map {name} (type {map_type}, {max_entries} entries)",
    )


def map_update(fd: int, key: int, value: int, flags: int = BPF_ANY) -> None:
    """Set ``key`` to ``value`` (both u32: an index, an fd, a map id)."""
    k, v = _u32(key), _u32(value)
    _check(_lib().bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(v), flags),
           f"update BPF map fd {fd} key {key}")


def map_lookup(fd: int, key: int) -> int | None:
    """The u32 at ``key``, None when the slot is empty (ENOENT).

    For an array of maps that is the inner map's id.
    """
    k, v = _u32(key), _u32()
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v))
    if ret == -errno.ENOENT:
        return None
    _check(ret, f"look up BPF map fd {fd} key {key}")
    return v.value


def map_delete(fd: int, key: int) -> bool:
    """Empty ``key``; False when it was empty already."""
    k = _u32(key)
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(k))
    if ret == -errno.ENOENT:
        return False
    _check(ret, f"delete key {key} of BPF map fd {fd}")
    return True


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link at ``path`` on a bpffs (EEXIST if taken)."""
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin BPF object at {path}")


def obj_get(path: str) -> int:
    """An fd of the object pinned at ``path`` (``NotFound`` when nothing is there)."""
    return _check(_lib().bpf_obj_get(path.encode()), f"open pinned BPF object {path}")


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = _u32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)


def map_info(fd: int) -> MapInfo:
    raw = _MapInfo()
    _info(fd, raw, f"info of BPF map fd {fd}")
    return MapInfo(raw.id, raw.type, raw.key_size, raw.value_size, raw.max_entries,
                   raw.map_flags, raw.name.decode(errors="replace"))


def prog_info(fd: int) -> ProgInfo:
    raw = _ProgInfo()
    _info(fd, raw, f"info of BPF program fd {fd}")
    # A second call with room for the map ids: the first one says how many there are.
    ids = (_u32 * raw.nr_map_ids)()
    with_maps = _ProgInfo(nr_map_ids=raw.nr_map_ids, map_ids=ctypes.addressof(ids))
    _info(fd, with_maps, f"map ids of BPF program fd {fd}")
    return ProgInfo(raw.id, raw.type, bytes(raw.tag).hex(), raw.name.decode(errors="replace"),
                    tuple(ids))


def link_info(fd: int) -> LinkInfo:
    raw = _LinkInfo()
    _info(fd, raw, f"info of BPF link fd {fd}")
    return LinkInfo(raw.id, raw.type, raw.prog_id, raw.ifindex)


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"open BPF program id {prog_id}")


# --- XDP ------------------------------------------------------------------------------


def xdp_link_create(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program to ``ifindex`` as a BPF link (fd returned, caller closes).

    ``flags``: XDP_FLAGS_DRV_MODE or XDP_FLAGS_SKB_MODE. The program stays
    attached while the link lives: pin it to outlive this process.
    """
    opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
    return _check(_lib().bpf_link_create(prog_fd, ifindex, BPF_XDP, opts),
                  f"attach XDP program to ifindex {ifindex} (flags {flags:#x})")


def link_update(link_fd: int, prog_fd: int, *, expected_prog_fd: int) -> None:
    """Swap the link's program in one step, if it still runs ``expected_prog_fd`` (else EPERM)."""
    opts = _LinkUpdateOpts(sz=ctypes.sizeof(_LinkUpdateOpts), flags=BPF_F_REPLACE,
                           old_prog_fd=expected_prog_fd)
    _check(_lib().bpf_link_update(link_fd, prog_fd, opts),
           f"replace the program of link fd {link_fd}")


def xdp_query(ifindex: int) -> XdpQuery:
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(_lib().bpf_xdp_query(ifindex, 0, opts), f"query XDP programs of ifindex {ifindex}")
    return XdpQuery(opts.prog_id, opts.drv_prog_id, opts.skb_prog_id, opts.hw_prog_id)


def xdp_test_run(prog_fd: int, frame: bytes, *, ifindex: int, rx_queue: int) -> int:
    """Run an XDP program once on ``frame`` as if received on ``ifindex`` RX queue ``rx_queue``.

    Returns its verdict (XDP_PASS 2, XDP_REDIRECT 4, ...). BPF_PROG_TEST_RUN
    runs the program only: a redirect is decided, not carried out.
    """
    return xdp_test_run_timed(prog_fd, frame, ifindex=ifindex, rx_queue=rx_queue)[0]


def xdp_test_run_timed(prog_fd: int, frame: bytes, *, ifindex: int, rx_queue: int,
                       repeat: int = 1, live: bool = False) -> tuple[int, int]:
    """``xdp_test_run`` ``repeat`` times in the kernel: (verdict, mean ns per run).

    The kernel times its own loop (``duration``): the program plus the test
    harness's per-run reset of the frame, without any syscall in between.
    ``live`` (BPF_F_TEST_XDP_LIVE_FRAMES): each run is a real frame and the
    program's verdict is carried out (a redirect delivers it to the target,
    an AF_XDP socket included); the verdict returned is then meaningless (0).
    """
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=ifindex, rx_queue_index=rx_queue)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.addressof(data),
        data_size_in=len(frame),
        ctx_in=ctypes.addressof(ctx),
        ctx_size_in=ctypes.sizeof(ctx),
        repeat=repeat,
        flags=BPF_F_TEST_XDP_LIVE_FRAMES if live else 0,
    )
    _check(_lib().bpf_prog_test_run_opts(prog_fd, opts),
           f"test-run XDP program fd {prog_fd} on ifindex {ifindex} queue {rx_queue}")
    return int(opts.retval), int(opts.duration)
