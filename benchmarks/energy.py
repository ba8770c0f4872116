"""Energy per token: measured where the machine exposes counters, otherwise estimated, and for
a named device (`--target rpi4|rpi5|laptop`) the device's own decode time estimated too.

Measured (`--target host`)
- Linux RAPL (`/sys/class/powercap/intel-rapl*/energy_uj`, package domains): joules read
  before and after a phase. It is the whole CPU package, not just this process: run the
  benchmark on a quiet machine. Counters wrap at `max_energy_range_uj`; handled.
- NVML (`nvmlDeviceGetTotalEnergyConsumption`, mJ since driver load) on NVIDIA GPUs when
  `pynvml` (the `nvidia-ml-py` package, extra `bench`) is importable; added to the CPU figure.
Where neither is readable (most VMs), `host` is a *generic* estimate: a per-CPU power figure
that is not a property of this machine, and the report says so.

Estimated
    P = idle_w + utilisation * (peak_w - idle_w),   E = P * time
with utilisation = process CPU time / (wall time * CPUs the process may use), measured per
phase here. For `host` the time is the one measured here. For a device (rpi4, rpi5, laptop) a
decode step would take longer (or shorter) than here, so its time per token is estimated from the
variant's work per token and the device's published hardware figures:
    memory bound:  t_mem = bytes of weights read per token / the device's memory bandwidth
    compute bound: t_cmp = multiply-accumulates per token / the device's peak MAC rate
                   (int8 dot products for quantized weights, fp32 FMA for float ones)
and E = P(all cores busy) * max(t_mem, t_cmp). Both bounds are reported, labelled; real decode is
slower than either (kernel efficiency, KV cache reads), so the device estimate is a lower bound
on time and on energy. The power curve times the time measured *here* is kept beside it, labelled,
for comparison (it is too low when the device is slower than this machine).

Profiles (watts at the wall or at the device's supply; hardware figures; sources in the comments):
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    idle_w: float  # per CPU when per_cpu, else for the whole device
    peak_w: float
    source: str
    per_cpu: bool = False  # generic host profile: watts per usable CPU
    bandwidth_gbs: float | None = None  # sustained DRAM read bandwidth (devices only)
    peak_gmacs_int8: float | None = None  # all cores, int8 dot products
    peak_gmacs_fp32: float | None = None  # all cores, fp32 FMA
    hardware_source: str = ""

    def power(self, utilisation: float, cpus: int = 1) -> float:
        u = min(max(utilisation, 0.0), 1.0)
        w = self.idle_w + u * (self.peak_w - self.idle_w)
        return w * cpus if self.per_cpu else w

    @property
    def is_device(self) -> bool:
        return self.bandwidth_gbs is not None

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    # No counters readable: a generic figure, not this machine's. ~4 W per busy hardware thread
    # is a typical CPU's TDP per thread (e.g. a 500 W 256-thread AMD EPYC 9755: 1.95 W; a 45 W
    # 20-thread laptop i7-12700H: 2.3 W; a 125 W 20-thread desktop i5-13600K: 6.3 W); active idle
    # ~30 % of that (SPECpower_ssj2008 server results). DRAM and platform power not included.
    "host": Profile(
        "host",
        "this machine, generic estimate (no RAPL/NVML counters readable)",
        1.2,
        4.0,
        "generic: ~4 W per busy usable CPU (typical TDP / hardware threads), idle ~30 %; not a measurement of this "
        "machine",
        per_cpu=True,
    ),
    # A 14" x86 laptop with a P-series CPU (e.g. Intel Core i7-1260P: processor base power 28 W,
    # Intel ARK) plus ~7 W for the rest of the platform under load; Notebookcheck's idle
    # measurements of such laptops are typically 4-8 W at the wall (display on, low brightness).
    # Memory: Intel ARK lists 76.8 GB/s max memory bandwidth for the i7-1260P (dual-channel
    # DDR5/LPDDR5-4800); sustained read assumed 70 % of that (typical STREAM efficiency) = 54 GB/s.
    # Compute: 4 P-cores (2x 256-bit FMA: 16 fp32 MAC/cycle; AVX-VNNI: 64 int8 MAC/cycle) at
    # ~3.0 GHz all-core + 8 E-cores (2x 128-bit: 8 fp32, 32 int8 MAC/cycle) at ~2.5 GHz:
    # fp32 4*3.0*16 + 8*2.5*8 = 352 GMAC/s, int8 4*3.0*64 + 8*2.5*32 = 1408 GMAC/s.
    "laptop": Profile(
        "laptop",
        "14-inch x86 laptop, 28 W-class P-series CPU (i7-1260P class)",
        6.0,
        35.0,
        "Intel ARK i7-1260P base power 28 W + ~7 W platform; Notebookcheck idle 4-8 W",
        bandwidth_gbs=54.0,
        peak_gmacs_int8=1408.0,
        peak_gmacs_fp32=352.0,
        hardware_source="Intel ARK i7-1260P: 76.8 GB/s max memory bandwidth, x 0.7 sustained; "
        "4P+8E cores, AVX-VNNI / FMA peak MAC rates at all-core clocks",
    ),
    # Raspberry Pi 4 Model B, headless: 540 mA (2.7 W) idle, 1280 mA (6.4 W) at 400 % CPU
    # (stress --cpu 4), Jeff Geerling's measurements, https://www.pidramble.com/wiki/benchmarks/power-consumption
    # Memory: LPDDR4-3200 on a 32-bit bus = 12.8 GB/s wire rate; measured STREAM copy 5.5 GB/s
    # (https://www.sci-pi.org.uk/bench/stream.html, Pi 4, headless) -> 5.5 GB/s.
    # Compute: 4x Cortex-A72 at 1.5 GHz, two 128-bit NEON pipes: 8 fp32 MAC/cycle (FMLA) = 48
    # GMAC/s; no dot-product instructions, int8 via widening SMLAL ~16 MAC/cycle = 96 GMAC/s.
    "rpi4": Profile(
        "rpi4",
        "Raspberry Pi 4 Model B (4x Cortex-A72 1.5 GHz)",
        2.7,
        6.4,
        "pidramble.com power-consumption benchmarks: idle 2.7 W, stress --cpu 4 6.4 W",
        bandwidth_gbs=5.5,
        peak_gmacs_int8=96.0,
        peak_gmacs_fp32=48.0,
        hardware_source="LPDDR4-3200 x32 (12.8 GB/s wire); STREAM copy 5.5 GB/s (sci-pi.org.uk); "
        "4x A72 1.5 GHz, 2x128-bit NEON",
    ),
    # Raspberry Pi 5: ~3 W idle and ~8 W with all four cores loaded (Geekbench 7.9 W), at the
    # wall; https://github.com/geerlingguy/sbc-reviews/issues/21 and CNX Software's Pi 5 2GB/8GB
    # comparison (2024-08-27). Meters in that thread disagree by ~1-2 W: treat as +/-20 %.
    # Memory: LPDDR4X-4267 on a 32-bit bus (Raspberry Pi 5 product brief) = 17.1 GB/s wire rate;
    # sustained assumed at the Pi 4's measured STREAM / wire-rate ratio (5.5 / 12.8 = 0.43) = 7.3 GB/s.
    # Compute: 4x Cortex-A76 at 2.4 GHz, two 128-bit NEON pipes: 8 fp32 MAC/cycle = 76.8 GMAC/s;
    # SDOT (16 int8 MACs per instruction, 2 per cycle) 32 MAC/cycle = 307 GMAC/s.
    "rpi5": Profile(
        "rpi5",
        "Raspberry Pi 5 (4x Cortex-A76 2.4 GHz)",
        3.0,
        7.9,
        "geerlingguy/sbc-reviews#21 (idle ~3 W, all-core load 7.9 W); CNX Software 2024-08-27",
        bandwidth_gbs=7.3,
        peak_gmacs_int8=307.0,
        peak_gmacs_fp32=76.8,
        hardware_source="LPDDR4X-4267 x32 (17.1 GB/s wire, Raspberry Pi 5 product brief) x 0.43 "
        "(Pi 4's STREAM/wire ratio); 4x A76 2.4 GHz, 2x128-bit NEON with SDOT",
    ),
}
TARGETS = tuple(PROFILES)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- measured: RAPL and NVML -------------------------------------------------------------

RAPL_ROOT = "/sys/class/powercap"


def _rapl_domains(root: str = RAPL_ROOT) -> list[str]:
    """Top-level package domains whose counters this process can read."""
    out = []
    for d in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        if os.path.basename(d).count(":") != 1:  # subdomains (core, uncore, dram) are inside the package figure
            continue
        try:
            with open(os.path.join(d, "energy_uj")) as f:
                int(f.read())
            out.append(d)
        except (OSError, ValueError):
            continue
    return out


class Meter:
    """Reads the machine's energy counters (if any) around a phase: `read()` -> joules or None."""

    def __init__(self, rapl_root: str = RAPL_ROOT, nvml: bool = True):
        self.rapl = _rapl_domains(rapl_root)
        self.nvml = None
        try:
            if not nvml:
                raise ImportError
            import pynvml

            pynvml.nvmlInit()
            self.nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._pynvml = pynvml
        except Exception:
            self.nvml = None
        self._last: dict[str, int] = {}
        self._total_j = 0.0

    @property
    def available(self) -> bool:
        return bool(self.rapl or self.nvml)

    @property
    def method(self) -> str:
        parts = (["RAPL package counters"] if self.rapl else []) + (["NVML total energy"] if self.nvml else [])
        return " + ".join(parts)

    def read(self) -> float | None:
        """Cumulative joules since this meter was made (wrap-around handled), or None."""
        if not self.available:
            return None
        for d in self.rapl:
            with open(os.path.join(d, "energy_uj")) as f:
                now = int(f.read())
            prev = self._last.get(d, now)
            if now < prev:  # wrapped
                try:
                    with open(os.path.join(d, "max_energy_range_uj")) as f:
                        now_adj = now + int(f.read())
                except (OSError, ValueError):
                    now_adj = prev
                self._total_j += (now_adj - prev) / 1e6
            else:
                self._total_j += (now - prev) / 1e6
            self._last[d] = now
        for i, h in enumerate(self.nvml or []):
            now = self._pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # mJ
            key = f"nvml{i}"
            self._total_j += (now - self._last.get(key, now)) / 1e3
            self._last[key] = now
        return self._total_j


# ---- per-phase energy figures ------------------------------------------------------------


def phase_energy(phase: dict, tokens: int, profile: Profile) -> dict:
    """Energy figures for one timed phase (`wall_s`, `cpu_s`, `cpus`, optional `joules`), at the
    time measured here."""
    util = phase["cpu_s"] / max(phase["wall_s"] * phase["cpus"], 1e-12)
    est_w = profile.power(util, phase["cpus"])
    out = {
        "utilisation": round(min(util, 1.0), 4),
        "estimated_w": round(est_w, 3),
        "estimated_j_per_token": est_w * phase["wall_s"] / max(tokens, 1),
    }
    if phase.get("joules") is not None:
        out["measured_j_per_token"] = phase["joules"] / max(tokens, 1)
        out["measured_w"] = phase["joules"] / max(phase["wall_s"], 1e-12)
    return out


def device_estimate(traffic: dict, profile: Profile) -> dict:
    """The device's decode time per token from the variant's work per token (`traffic`:
    bytes_per_token, macs_per_token or None, quantized, source) and the device's hardware figures."""
    bpt, macs = traffic["bytes_per_token"], traffic.get("macs_per_token")
    t_mem = bpt / (profile.bandwidth_gbs * 1e9)
    peak = profile.peak_gmacs_int8 if traffic.get("quantized") else profile.peak_gmacs_fp32
    t_cmp = macs / (peak * 1e9) if macs else None
    t = max(t_mem, t_cmp or 0.0)
    return {
        "bytes_per_token": int(bpt),
        "macs_per_token": int(macs) if macs else None,
        "work_source": traffic.get("source", ""),
        "bandwidth_gbs": profile.bandwidth_gbs,
        "peak_gmacs": peak,
        "tg_tokens_per_s_memory_bound": 1.0 / t_mem,
        "tg_tokens_per_s_compute_bound": (1.0 / t_cmp) if t_cmp else None,
        "tg_tokens_per_s": 1.0 / t,
        "power_w": profile.power(1.0),
        "j_per_token_tg": profile.power(1.0) * t,
    }


def energy_summary(phases: dict, profile: Profile, meter_method: str | None, traffic: dict | None = None) -> dict:
    """The row's energy block: per-phase figures and a headline that says measured or estimated.

    `phases`: {"pp": {wall_s, cpu_s, cpus, tokens, joules?}, "tg": {...}}; `traffic`: the
    variant's work per decode token (device targets need it for their own time estimate).
    """
    per = {name: phase_energy(p, p["tokens"], profile) for name, p in phases.items()}
    tg = per.get("tg", {})
    out = {"target": profile.name, "phases": per}
    if not profile.is_device:
        if meter_method and "measured_j_per_token" in tg:
            out.update(kind="measured", j_per_token_tg=tg["measured_j_per_token"], method=meter_method)
        else:
            out.update(
                kind="estimated",
                j_per_token_tg=tg.get("estimated_j_per_token"),
                method=f"generic estimate (no energy counters readable): {profile.idle_w} W idle + utilisation x "
                f"({profile.peak_w} - {profile.idle_w}) W per usable CPU, over the measured wall time",
            )
        return out
    if traffic is None:  # no work figures: only the power curve over this machine's time
        out.update(
            kind="estimated",
            j_per_token_tg=tg.get("estimated_j_per_token"),
            method=f"profile '{profile.name}' power curve over the time measured on this machine (no per-token work "
            f"figures for a device-time estimate)",
        )
        return out
    dev = device_estimate(traffic, profile)
    dev["j_per_token_tg_at_host_time"] = tg.get("estimated_j_per_token")
    out.update(
        kind="estimated",
        j_per_token_tg=dev["j_per_token_tg"],
        device=dev,
        method=f"device estimate for '{profile.name}': {profile.peak_w} W (all cores) x max(memory bound "
        f"{dev['bytes_per_token'] / 1e6:.1f} MB/token / {profile.bandwidth_gbs} GB/s, compute bound "
        + (
            f"{dev['macs_per_token'] / 1e6:.0f} M MAC/token / {dev['peak_gmacs']:g} GMAC/s)"
            if dev["macs_per_token"]
            else "n/a)"
        ),
    )
    return out
