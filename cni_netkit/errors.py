"""The one error tree of cni-netkit, each class carrying its CNI error code.

The CNI entry point is the only place that turns these into the error JSON
(``{"cniVersion", "code", "msg", "details"}``) and an exit status; nothing
else prints.  Codes 1-99 are the CNI spec's, 100+ are ours and documented in
the README ("Error codes").
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from typing import ClassVar


class NetkitError(Exception):
    """Base of every error this project raises on purpose."""

    code: ClassVar[int] = 999

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg


# --- CNI spec codes ---------------------------------------------------------


class IncompatibleVersion(NetkitError):
    """The request's ``cniVersion`` is not one of ``SUPPORTED_VERSIONS``."""

    code = 1


# The CNI spec versions we speak, oldest first. Here, in the bottom layer,
# because the config parser, the result encoder and the entry point (which
# answers VERSION without importing either) all need this one list.
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


class UnsupportedField(NetkitError):
    code = 2


class UnknownContainer(NetkitError):
    code = 3


class InvalidEnvironment(NetkitError):
    code = 4


class IOFailure(NetkitError):
    code = 5


class DecodeFailure(NetkitError):
    code = 6


class InvalidConfig(NetkitError):
    code = 7


class InvalidNetns(NetkitError):
    """libcni's code 8: the netns path is missing or is not a network namespace."""

    code = 8


class TryAgainLater(NetkitError):
    code = 11


class NotAvailable(NetkitError):
    """STATUS only: the plugin cannot serve ADD now (e.g. no free queue)."""

    code = 50


class Degraded(NetkitError):
    """STATUS only: not available, and existing attachments are degraded."""

    code = 51


# --- cni-netkit codes (>= 100) -----------------------------------------------


class PoolExhausted(NetkitError):
    """No free queue left in the master's pool."""

    code = 100


class InterfaceExists(NetkitError):
    """The pod-side name (CNI_IFNAME, or the config's podIfname) is taken in the pod netns."""

    code = 101


class CheckFailed(NetkitError):
    """CHECK found the attachment different from what ADD made."""

    code = 102


class IPAMFailure(NetkitError):
    """The delegated IPAM plugin failed."""

    code = 103


class MasterNotFound(NetkitError):
    """The configured master NIC does not exist in the host netns."""

    code = 104


# --- kernel errors: raised by cni_netkit.kernel, `from` the netlink error ---


class KernelError(NetkitError):
    """A netlink request failed; ``errno`` and the kernel's extack text are kept."""

    code = 110
    errno: ClassVar[int | None] = None

    def __init__(self, msg: str, details: str = "", *, err: int | None = None) -> None:
        super().__init__(msg, details)
        self.err = err if err is not None else self.errno


class KernelUnsupported(KernelError):
    """The running kernel lacks netkit or the netdev family's queue-create.

    Queue leasing first shipped in Linux 7.1 (the 7.0 merge was reverted before release).
    """

    code = 111


class QueueBusy(KernelError):
    """queue-create: the queue is leased, bound by AF_XDP or has a memory provider."""

    errno = _errno.EBUSY


class QueueOutOfRange(KernelError):
    """queue-create: the queue id is not below the lessor's real_num_rx_queues."""

    errno = _errno.ERANGE


class NoSuchDevice(KernelError):
    errno = _errno.ENODEV


class NoSuchNetnsId(KernelError):
    errno = _errno.ENONET


class NotSupported(KernelError):
    errno = _errno.EOPNOTSUPP


class InvalidRequest(KernelError):
    errno = _errno.EINVAL


class PermissionDenied(KernelError):
    errno = _errno.EPERM


class NotFound(KernelError):
    errno = _errno.ENOENT


class AlreadyExists(KernelError):
    errno = _errno.EEXIST


# What an errno means whatever the request: EBUSY or ERANGE from another request
# than queue-create (an MTU out of range, a device busy) is not about queues.
KERNEL_ERRORS: dict[int, type[KernelError]] = {
    cls.errno: cls
    for cls in (
        NoSuchDevice,
        NoSuchNetnsId,
        NotSupported,
        InvalidRequest,
        PermissionDenied,
        NotFound,
        AlreadyExists,
    )
    if cls.errno is not None
}


# What queue-create's errnos mean (the kernel's netdev_nl_queue_create_doit).
QUEUE_CREATE_ERRORS: dict[int, type[KernelError]] = {
    cls.errno: cls for cls in (QueueBusy, QueueOutOfRange) if cls.errno is not None
}


def kernel_error(
    err: int, what: str, extack: str = "", errors: Mapping[int, type[KernelError]] | None = None
) -> KernelError:
    """The KernelError subclass for ``err``, its message naming the failed request.

    ``errors``: what errnos mean for this request in particular (e.g.
    ``QUEUE_CREATE_ERRORS``), looked up before the meanings every request shares.
    """
    cls = (errors or {}).get(err) or KERNEL_ERRORS.get(err, KernelError)
    reason = _errno.errorcode.get(err, str(err))
    return cls(f"{what}: {reason} ({_os_strerror(err)})", extack, err=err)


def _os_strerror(err: int) -> str:
    import os  # noqa: PLC0415 - only needed on this error path

    return os.strerror(err)
