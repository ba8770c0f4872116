"""Energy per token: measured where the machine exposes counters, otherwise estimated.

Measured
- Linux RAPL (`/sys/class/powercap/intel-rapl*/energy_uj`, package domains): joules read
  before and after a phase. It is the whole CPU package, not just this process: run the
  benchmark on a quiet machine. Counters wrap at `max_energy_range_uj`; handled.
- NVML (`nvmlDeviceGetTotalEnergyConsumption`, mJ since driver load) on NVIDIA GPUs when
  `pynvml` is importable; added to the CPU figure.

Estimated (when neither is readable, as in most VMs and on a Pi)
    P = idle_w + utilisation * (peak_w - idle_w),   E = P * wall_time
with utilisation = process CPU time / (wall time * CPUs the process may use), measured per
phase. The target's power curve is applied to the load measured here: the estimate answers
"what would this device draw at this utilisation for this long"; it does not model the
target's speed. Idle power is charged to the run (whole-device energy, as a wall meter sees it).

Profiles (watts at the wall or at the device's supply; sources in the comments):
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    idle_w: float
    peak_w: float
    source: str

    def power(self, utilisation: float) -> float:
        u = min(max(utilisation, 0.0), 1.0)
        return self.idle_w + u * (self.peak_w - self.idle_w)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    # This machine: a 2-vCPU KVM guest on an AMD EPYC Zen 5 host ("AMD EPYC", family 26 =
    # EPYC 9005 "Turin"). No RAPL is exposed to the guest, so the profile is this VM's share of
    # the host CPU: AMD EPYC 9755 (128 cores / 256 threads) has a 500 W default TDP (AMD product
    # page), i.e. ~1.95 W per hardware thread at full load -> 2 vCPUs ~= 3.9 W peak. Active idle
    # of EPYC servers in SPECpower_ssj2008 results is roughly 25-30 % of full-load power, so
    # idle ~= 0.3 * 3.9 ~= 1.2 W. DRAM and platform power are not included. Rough by design:
    # use it to compare variants on this machine, not as a wall-meter reading.
    "this": Profile("this", "this machine: 2 vCPU share of an AMD EPYC 9005 (Zen 5) host CPU", 1.2, 3.9,
                    "AMD EPYC 9755 500 W TDP / 256 threads x 2 vCPU; idle ~30% per SPECpower_ssj2008 EPYC results"),
    # A 14" x86 laptop with a P-series CPU (e.g. Intel Core i7-1260P: processor base power 28 W,
    # Intel ARK) plus ~7 W for the rest of the platform under load; Notebookcheck's idle
    # measurements of such laptops are typically 4-8 W at the wall (display on, low brightness).
    "laptop": Profile("laptop", "14-inch x86 laptop, 28 W-class P-series CPU", 6.0, 35.0,
                      "Intel ARK i7-1260P base power 28 W + ~7 W platform; Notebookcheck idle 4-8 W"),
    # Raspberry Pi 4 Model B, headless: 540 mA (2.7 W) idle, 1280 mA (6.4 W) at 400 % CPU
    # (stress --cpu 4), Jeff Geerling's measurements, https://www.pidramble.com/wiki/benchmarks/power-consumption
    "rpi4": Profile("rpi4", "Raspberry Pi 4 Model B (4x Cortex-A72 1.5 GHz)", 2.7, 6.4,
                    "pidramble.com power-consumption benchmarks: idle 2.7 W, stress --cpu 4 6.4 W"),
    # Raspberry Pi 5: ~3 W idle and ~8 W with all four cores loaded (Geekbench 7.9 W), at the
    # wall; https://github.com/geerlingguy/sbc-reviews/issues/21 and CNX Software's Pi 5 2GB/8GB
    # comparison (2024-08-27). Meters in that thread disagree by ~1-2 W: treat as +/-20 %.
    "rpi5": Profile("rpi5", "Raspberry Pi 5 (4x Cortex-A76 2.4 GHz)", 3.0, 7.9,
                    "geerlingguy/sbc-reviews#21 (idle ~3 W, all-core load 7.9 W); CNX Software 2024-08-27"),
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
    """Energy figures for one timed phase (`wall_s`, `cpu_s`, `cpus`, optional `joules`)."""
    util = phase["cpu_s"] / max(phase["wall_s"] * phase["cpus"], 1e-12)
    est_w = profile.power(util)
    out = {"utilisation": round(min(util, 1.0), 4), "estimated_w": round(est_w, 3),
           "estimated_j_per_token": est_w * phase["wall_s"] / max(tokens, 1)}
    if phase.get("joules") is not None:
        out["measured_j_per_token"] = phase["joules"] / max(tokens, 1)
        out["measured_w"] = phase["joules"] / max(phase["wall_s"], 1e-12)
    return out


def energy_summary(phases: dict, profile: Profile, meter_method: str | None) -> dict:
    """The row's energy block: per-phase figures and a headline that says measured or estimated.

    `phases`: {"pp": {wall_s, cpu_s, cpus, tokens, joules?}, "tg": {...}}.
    """
    per = {name: phase_energy(p, p["tokens"], profile) for name, p in phases.items()}
    tg = per.get("tg", {})
    if profile.name == "this" and meter_method and "measured_j_per_token" in tg:
        kind, j, how = "measured", tg["measured_j_per_token"], meter_method
    else:
        kind, j = "estimated", tg.get("estimated_j_per_token")
        how = (f"profile '{profile.name}': {profile.idle_w} W idle + utilisation x "
               f"({profile.peak_w} - {profile.idle_w}) W, over the measured wall time")
    return {"kind": kind, "method": how, "target": profile.name, "j_per_token_tg": j, "phases": per}
