"""The benchmark's table: ``python -m bench.report OUTDIR`` reads host.json and guest.json.

Prints the tables and writes ``bench.json`` (both halves plus the headline
ratios) into OUTDIR.  The headline is ours / Go for ADD p50 and 16-concurrent
ADD p50, per comparable pair of scenarios (see ``bench.guest``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import write_json


def _f(x: Any, width: int = 8, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):  # noqa: PLR0124 - NaN check
        return "-".rjust(width)
    return f"{x:{width}.{digits}f}"


def headline(guest: dict[str, Any]) -> dict[str, Any]:
    """ours/Go ratios of ADD p50 and concurrent ADD p50, for each of our scenarios."""
    scen = guest.get("scenarios", {})
    go = {s["pairing"]: s for s in scen.values() if s["impl"] == "go"}
    out = {}
    for name, s in scen.items():
        ref = go.get(s["pairing"])
        if s["impl"] == "go" or ref is None:
            continue
        out[name] = {
            "vs": next(n for n, g in scen.items() if g is ref),
            "add_p50_ratio": _ratio(s["add"]["p50"], ref["add"]["p50"]),
            "add_p90_ratio": _ratio(s["add"]["p90"], ref["add"]["p90"]),
            "del_p50_ratio": _ratio(s["del"]["p50"], ref["del"]["p50"]),
            "conc_add_p50_ratio": _ratio(s["conc_add"]["p50"], ref["conc_add"]["p50"]),
        }
    return out


def _ratio(a: float, b: float) -> float | None:
    if not a or not b or a != a or b != b:  # noqa: PLR0124 - NaN
        return None
    return round(a / b, 2)


def print_guest(guest: dict[str, Any], heads: dict[str, Any]) -> None:
    p = guest["params"]
    if "scenarios" not in guest:  # --parts without control
        print(f"\n== VM: kernel {guest['kernel']} under QEMU TCG, 1 vCPU ==")
        print_rest(guest, p)
        return
    print(f"\n== VM: kernel {guest['kernel']} under QEMU TCG, 1 vCPU; ms; sequential n="
          f"{p['samples']} (cold n={p['cold_samples']}), {p['concurrency']} concurrent x "
          f"{p['rounds']} rounds (cold: 1) ==")
    print(f"{'scenario':42s} {'ADD p50':>8s} {'ADD p90':>8s} {'DEL p50':>8s} {'DEL p90':>8s} "
          f"{'16x ADD':>8s} {'16x DEL':>8s} {'RSS MB':>7s} {'ADD/Go':>7s} {'16xADD/Go':>9s}")
    for name, s in guest.get("scenarios", {}).items():
        h = heads.get(name, {})
        rss = s["maxrss_kb_p50"] / 1024 if s["maxrss_kb_p50"] else None
        fail = f"  [{s['failure_count']} failed]" if s["failure_count"] else ""
        if s.get("fallbacks"):
            fail += f"  [{s['fallbacks']} ran cold]"
        print(f"{name:42s} {_f(s['add']['p50'])} {_f(s['add']['p90'])} {_f(s['del']['p50'])} "
              f"{_f(s['del']['p90'])} {_f(s['conc_add']['p50'])} {_f(s['conc_del']['p50'])} "
              f"{_f(rss, 7)} {_f(h.get('add_p50_ratio'), 7, 2)} "
              f"{_f(h.get('conc_add_p50_ratio'), 9, 2)}{fail}")
    rss = guest.get("agent_rss_kb", {})
    print(f"agent process: VmRSS {rss.get('VmRSS', 0) / 1024:.0f} MB, "
          f"peak {rss.get('VmHWM', 0) / 1024:.0f} MB")
    for pairing, v in guest.get("relay_only", {}).items():
        print(f"agent's share, {pairing} (relayed in-process, no process start): "
              f"ADD p50 {v['add']['p50']:.0f}, DEL p50 {v['del']['p50']:.0f}")
    floors = guest.get("floors", {})
    if floors:
        print("process start floors: " + "; ".join(
            f"{k} {v['p50']:.0f}" for k, v in floors.items()))
    print_rest(guest, p)


def print_rest(guest: dict[str, Any], p: dict[str, Any]) -> None:
    """The parts after the scenarios: scale, steering, phases."""
    sc = guest.get("scale", {})
    if sc:
        print(f"\n== VM scale: warm ADD on a {sc.get('queues', 64)}-queue netdevsim, pool "
              f"{sc.get('pool', '0-63')}, n={p['scale_samples']} ==")
        for label, v in sc.items():
            if isinstance(v, dict) and "add" in v:
                print(f"{label:34s} ADD p50 {_f(v['add']['p50'])} p90 {_f(v['add']['p90'])}  "
                      f"DEL p50 {_f(v['del']['p50'])}")
        print(f"growth ratio (full pool / 1 lease): ADD p50 {sc.get('growth_ratio_add_p50')}, "
              f"p90 {sc.get('growth_ratio_add_p90')}; DEL p50 {sc.get('growth_ratio_del_p50')}"
              + (f"; paired per sample: ADD p50 {sc['paired_add_ratio']['p50']}"
                 if "paired_add_ratio" in sc else ""))
    print_steering(guest.get("steering", {}))
    print_proxy(guest.get("proxy", {}))
    print_phases("VM: phases of ADD (round 1: a fresh process; rounds 2+: warm, as in the agent)",
                 guest.get("phases", {}))
    ci = guest.get("phases", {}).get("cold_importtime")
    if ci:
        top = sorted(ci["self_ms_by_package"].items(), key=lambda kv: -kv[1])[:14]
        print(f"cold ADD (python -S) import self-time by package, ms, min of {ci['runs']} runs "
              f"(ADD p50 {ci['add_ms_p50_with_importtime']:.0f} ms with -X importtime): "
              + ", ".join(f"{k} {v:.0f}" for k, v in top))


def print_steering(st: dict[str, Any]) -> None:
    """bench.steering's table: ns per frame of each case, and the ratios."""
    if not st:
        return
    if "error" in st:
        print(f"\n== VM steering: {st['error'][-300:]} ==")
        return
    print(f"\n== VM steering: ns per frame, BPF_PROG_TEST_RUN x {st['repeat']}, n={st['samples']}, "
          f"{st['master']['driver']} master ({st['master']['xdp_mode']} XDP), "
          f"JIT {st['jit']} ==")
    print(f"{'case':22s} {'p50':>8s} {'p90':>8s} {'min':>8s} {'above bare p50':>15s}")
    for name, v in st["ns_per_frame"].items():
        print(f"{name:22s} {_f(v['p50'])} {_f(v['p90'])} {_f(v['min'])} "
              f"{_f(st['above_bare_ns_p50'][name], 15)}")
    print(f"{'ratio':36s} {'p50/p50':>8s} {'p90/p90':>8s} {'paired p50':>10s} {'paired p90':>10s}")
    for name, v in st["ratios"].items():
        pr = st["paired_ratios"][name]
        print(f"{name:36s} {_f(v['p50'], 8, 3)} {_f(v['p90'], 8, 3)} {_f(pr['p50'], 10, 2)} "
              f"{_f(pr['p90'], 10, 2)}")


def print_proxy(px: dict[str, Any]) -> None:
    """bench.proxy's tables: AF_XDP receive through the netkit's leased queue vs directly,
    and the loopback receive path with the program native vs generic."""
    if not px:
        return
    if "error" in px:
        print(f"\n== VM proxy: {px['error'][-300:]} ==")
        return
    print(f"\n== VM proxy: AF_XDP {px['mode']}, live frames x {px['batch']} per sample on "
          f"queue {px['queue']}, n={px['samples']} per side in {px['rounds']} interleaved "
          f"blocks each, {px['master']['driver']} master ({px['master']['xdp_mode']} XDP) ==")
    print(f"{'socket bound to':28s} {'ns p50':>8s} {'ns p90':>8s} {'ns min':>8s} "
          f"{'frames/s p50':>13s} {'frames/s p90':>13s} {'delivered':>10s} {'lost':>5s}")
    for name, v in px["ns_per_frame"].items():
        label = {"leased": "netkit's leased queue", "direct": "the physical queue"}.get(name, name)
        rate = px["frames_per_s_at"][name]
        print(f"{label:28s} {_f(v['p50'])} {_f(v['p90'])} {_f(v['min'])} {rate['p50']:13d} "
              f"{rate['p90']:13d} {px['frames_delivered'][name]:10d} {px['frames_lost'][name]:5d}")
    r, pr = px["rate_ratio_leased_vs_direct"], px["paired_rate_ratio"]
    print(f"receive rate, leased / direct: p50 {r['p50']:.3f}, p90 {r['p90']:.3f}, "
          f"p10 {r['p10']:.3f}, min {r['min']:.3f} "
          f"(paired per sample: p50 {pr['p50']:.3f}, p90 {pr['p90']:.3f}); "
          f"{px['wall_s']} s")
    tm = px.get("two_masters")
    if tm:
        print(f"\n== VM proxy, cross-check: {tm['masters']}, live frames x {tm['batch']}, "
              f"n={tm['samples']} per side, {tm['order']} ==")
        print(f"{'socket bound to':28s} {'ns p50':>8s} {'ns p90':>8s} {'ns min':>8s} "
              f"{'frames/s p50':>13s} {'frames/s p90':>13s} {'delivered':>10s} {'lost':>5s}")
        for name, v in tm["ns_per_frame"].items():
            rate = tm["frames_per_s_at"][name]
            print(f"{name:28s} {_f(v['p50'])} {_f(v['p90'])} {_f(v['min'])} "
                  f"{rate['p50']:13d} {rate['p90']:13d} {tm['frames_delivered'][name]:10d} "
                  f"{tm['frames_lost'][name]:5d}")
        r, pr = tm["rate_ratio_leased_vs_direct"], tm["paired_rate_ratio"]
        print(f"receive rate, leased / direct: p50 {r['p50']:.3f}, p90 {r['p90']:.3f}, "
              f"p10 {r['p10']:.3f}, min {r['min']:.3f} (paired per sample: p50 {pr['p50']:.3f}, "
              f"p90 {pr['p90']:.3f}); {tm['wall_s']} s")
    lb = px.get("loopback")
    if not lb:
        return
    print(f"\n== VM proxy, real receive path: {lb['master']}; "
          f"{lb['frames_per_sample']} frames per sample, n={lb['samples']} per mode in "
          f"{lb['rounds']} interleaved blocks each ==")
    print(f"{'program, socket':28s} {'ns p50':>8s} {'ns p90':>8s} {'ns min':>8s} "
          f"{'frames/s p50':>13s} {'frames/s p90':>13s} {'delivered':>10s} {'lost':>5s}")
    for name, v in lb["ns_per_frame"].items():
        rate = lb["frames_per_s_at"][name]
        print(f"{name:28s} {_f(v['p50'])} {_f(v['p90'])} {_f(v['min'])} {rate['p50']:13d} "
              f"{rate['p90']:13d} {lb['frames_delivered'][name]:10d} {lb['frames_lost'][name]:5d}")
    for label, key in (("native / generic", "rate_ratio_native_vs_generic"),
                       ("leased / direct", "rate_ratio_leased_vs_direct")):
        r = lb[key]
        print(f"receive rate, {label}: p50 {r['p50']:.3f}, p90 {r['p90']:.3f}, "
              f"min {r['min']:.3f} "
              f"(paired per sample: p50 {r['paired']['p50']:.3f}, "
              f"p90 {r['paired']['p90']:.3f})")
    print(f"{lb['wall_s']} s")


def print_phases(title: str, phases: dict[str, Any]) -> None:
    if not phases or "error" in phases:
        print(f"\n== {title}: {phases.get('error', 'not measured')[-300:]} ==")
        return
    print(f"\n== {title} ==")
    for k, v in phases["imports"].items():
        print(f"  {k:38s} {_f(v)}")
    rounds = phases["rounds"]
    keys = [k for k, v in rounds[0].items() if isinstance(v, int | float)]
    print(f"  {'':38s} {'round 1':>8s} {'warm p50':>8s}")
    for k in keys:
        warm = sorted(r[k] for r in rounds[1:]) if len(rounds) > 1 else []
        print(f"  {k:38s} {_f(rounds[0][k], 8, 2)} "
              f"{_f(warm[len(warm) // 2] if warm else None, 8, 2)}")
    print(f"  outcome: {rounds[0].get('outcome')}; netlink calls (round 1): " + ", ".join(
        f"{k} {v['count']}x {v['ms']:.1f}" for k, v in rounds[0]["netlink calls"].items()))


def print_host(host: dict[str, Any]) -> None:
    print("\n== host: VERSION and STATUS (host kernel has no netkit: STATUS answers 50), ms ==")
    print(f"{'case':40s} {'p50':>8s} {'p90':>8s} {'RSS MB':>7s}  outcome")
    for name, v in host["latency"].items():
        rss = v["maxrss_kb_p50"] / 1024 if v.get("maxrss_kb_p50") else None
        print(f"{name:40s} {_f(v['p50'])} {_f(v['p90'])} {_f(rss, 7)}  "
              f"{v['outcome'][:50]}")
    top = sorted(host["importtime_cold_status_ms"].items(), key=lambda kv: -kv[1])[:12]
    print("cold STATUS import self-time by package (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in top))
    print_phases("host: phases of STATUS", host.get("phases_status", {}))


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    doc: dict[str, Any] = {}
    if (out / "host.json").exists():
        doc["host"] = json.loads((out / "host.json").read_text())
        print_host(doc["host"])
    if (out / "guest.json").exists():
        doc["guest"] = json.loads((out / "guest.json").read_text())
        doc["headline"] = headline(doc["guest"])
        print_guest(doc["guest"], doc["headline"])
    write_json(out / "bench.json", doc)
    print(f"\nJSON: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
