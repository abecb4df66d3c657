"""Where one ADD's time goes, phase by phase, in a fresh process (prints JSON on stdout).

``python -m bench.phases --master M --netns N --state-dir D [--repeat R]``

Round 1 is a cold invocation's work (after the imports, timed one by one);
rounds 2.. repeat it in the same process, as the agent does for every
request.  Marks are taken here, around the plugin's real functions (the lock,
every kernel-seam call, the state store, IPAM delegation), so no timing code
lives in the plugin itself.  ``--command STATUS`` does the same for STATUS
(what a host without netkit can run).  After each ADD round the DEL that
undoes it is timed the same way (``del_rounds``).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # interpreter start and site are before this line

import argparse  # noqa: E402 - everything below is timed from STARTED
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

_acc: dict[str, float] = defaultdict(float)
_calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class TimedKernel:
    """The kernel seam with a stopwatch on every call (socket setup included)."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._kernel, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                _acc["netlink"] += dt
                _calls[name][0] += 1
                _calls[name][1] += dt

        return timed


def _wrap(owner: Any, name: str, phase: str) -> None:
    real = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _acc[phase] += time.perf_counter() - t

    setattr(owner, name, timed)


def _instrument(commands: Any) -> None:
    real_lock = commands.master_lock

    @contextmanager
    def timed_lock(*args: Any, **kwargs: Any) -> Iterator[None]:
        t = time.perf_counter()
        with real_lock(*args, **kwargs):
            _acc["lock wait"] += time.perf_counter() - t
            yield

    commands.master_lock = timed_lock
    _wrap(commands.StateStore, "save", "state records")
    _wrap(commands.StateStore, "remove", "state records")
    _wrap(commands.StateStore, "load", "state records")
    _wrap(commands.ipam, "delegate", "ipam exec")
    _wrap(commands.afxdp, "wire", "afxdp wire")


def _import_phases() -> dict[str, float]:
    """Import the layers one by one, in the order a cold ADD loads them."""
    phases: dict[str, float] = {}

    def step(name: str, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        fn()
        phases[name] = _ms(time.perf_counter() - t)

    phases["harness stdlib"] = _ms(time.perf_counter() - STARTED)
    step("import entry+client (stdlib)", lambda: __import__("cni_netkit.cni.entry"))

    def structlog() -> None:
        from cni_netkit import logs  # noqa: PLC0415

        logs.skip_optional_extras()
        __import__("structlog")

    step("import logs+structlog", structlog)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")  # as entry's cold path
    step("import config (pydantic)", lambda: __import__("cni_netkit.config"))
    step("import plugin", lambda: __import__("cni_netkit.plugin.commands"))
    # as the plugin loads it: through cni_netkit.kernel, which skips pyroute2's
    # package __init__ (importing kernel.api directly would pay for all of it)
    step("import kernel (pyroute2)",
         lambda: __import__("cni_netkit.kernel", fromlist=["Kernel"]).Kernel)
    return phases


def _round(command: str, env: dict[str, str], conf: bytes) -> dict[str, Any]:
    from cni_netkit import logs  # noqa: PLC0415
    from cni_netkit.config import parse_invocation  # noqa: PLC0415
    from cni_netkit.errors import NetkitError  # noqa: PLC0415
    from cni_netkit.kernel import Kernel  # noqa: PLC0415
    from cni_netkit.plugin import commands  # noqa: PLC0415

    _acc.clear()
    _calls.clear()
    phases: dict[str, Any] = {}
    t = time.perf_counter()
    logs.configure()
    logs.new_context(command=command)
    phases["log setup"] = _ms(time.perf_counter() - t)
    t = time.perf_counter()
    inv = parse_invocation({**env, "CNI_COMMAND": command}, conf)
    logs.configure(level=inv.config.log_level, log_file=inv.config.log_file)
    phases["config parse"] = _ms(time.perf_counter() - t)
    t = time.perf_counter()
    result = None
    phases["outcome"] = "ok"
    try:
        with Kernel() as kernel:
            result = commands.run(inv, TimedKernel(kernel))
    except NetkitError as e:  # STATUS on a host without netkit: still a full STATUS path
        phases["outcome"] = f"error {e.code}: {e.msg}"
    plugin = time.perf_counter() - t
    for name in ("lock wait", "netlink", "state records", "ipam exec", "afxdp wire"):
        phases[name] = _ms(_acc[name])
    phases["plugin logic (rest)"] = _ms(plugin - sum(_acc.values()))
    t = time.perf_counter()
    if result is not None:
        sys.stderr.write(json.dumps(result.encode(inv.config.cni_version)) + "\n")
    phases["result encode+print"] = _ms(time.perf_counter() - t)
    phases["netlink calls"] = {
        k: {"count": int(v[0]), "ms": _ms(v[1])} for k, v in sorted(_calls.items())
    }
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases")
    parser.add_argument("--command", default="ADD", choices=["ADD", "STATUS"])
    parser.add_argument("--master", required=True)
    parser.add_argument("--queues", default="0-15")
    parser.add_argument("--netns", default="")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--conf", default="{}", help="extra config keys (JSON)")
    args = parser.parse_args()
    imports = _import_phases()
    from cni_netkit.plugin import commands  # noqa: PLC0415

    _instrument(commands)
    conf = json.dumps({
        "cniVersion": "1.1.0", "name": "phases", "type": "netkit", "master": args.master,
        "queues": args.queues, "stateDir": args.state_dir, **json.loads(args.conf),
    }).encode()
    # In-process, the plugin reads the process's environment: the node's admin
    # declares the master (ADD is closed by default).
    os.environ["CNI_NETKIT_MASTERS"] = f"{args.master}={args.queues}"
    env = {"CNI_CONTAINERID": "phases", "CNI_NETNS": args.netns, "CNI_IFNAME": "net1",
           "CNI_PATH": os.environ.get("CNI_NETKIT_CNI_PLUGINS", ""), "PATH": os.environ["PATH"],
           "CNI_NETKIT_STATE_DIRS": args.state_dir}
    rounds, del_rounds = [], []
    for _ in range(args.repeat):
        rounds.append(_round(args.command, env, conf))
        if args.command == "ADD":
            del_rounds.append(_round("DEL", env, conf))
    out: dict[str, Any] = {"command": args.command, "imports": imports, "rounds": rounds}
    if del_rounds:
        out["del_rounds"] = del_rounds
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
