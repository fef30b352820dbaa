"""The SM clock and board power while a benchmark runs: ``nvidia-smi`` sampling in the background.

A card at its power limit lowers its clock, and a kernel's time with it (the H100 at D = 128:
``bench/results/power_probe_2026-12-05_h100_4513a72.md``), so a timing means more with the clock
and power it ran at. :class:`ClockSampler` starts ``nvidia-smi --query-gpu=... -lms 100`` into a
file and :meth:`ClockSampler.window` summarises the samples taken between two ``time.time()``
stamps: median and minimum SM clock (MHz), median power (W), and the share of samples with the software
power cap among the active clock-throttle reasons. Without nvidia-smi every summary is empty
(the benchmark's columns stay blank), never an error.
"""
from __future__ import annotations

import bisect
import datetime as dt
import os
import statistics
import subprocess
import tempfile

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
POWER_CAP = 0x4          # clocks_throttle_reasons: the software power cap


def parse_sample(line):
    """``(time.time() stamp, SM MHz, W, degrees C, throttle reasons)`` of one line of
    ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits``, or None (a header, a partial
    line, "[N/A]")."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return t, float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16)
    except ValueError:
        return None


def summarize(samples):
    """``{"sm_mhz", "sm_mhz_min", "power_w", "power_capped"}`` of samples (parse_sample
    tuples); {} if none."""
    if not samples:
        return {}
    return {"sm_mhz": statistics.median(s[1] for s in samples),
            "sm_mhz_min": min(s[1] for s in samples),
            "power_w": statistics.median(s[2] for s in samples),
            "power_capped": sum(1 for s in samples if s[4] & POWER_CAP) / len(samples)}


class ClockSampler:
    """Background nvidia-smi samples of GPU ``index`` every ``interval_ms``; ``path``: read
    samples already written there instead of starting nvidia-smi (tests)."""

    def __init__(self, index=0, interval_ms=100, path=None):
        self.proc = None
        self.samples = []          # parse_sample tuples, in time order
        self._times = []
        self._temporary = path is None
        if path is None:
            f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
            path = f.name
            try:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "-i", str(index), f"--query-gpu={QUERY}",
                     "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                    stdout=f, stderr=subprocess.DEVNULL)
            except OSError:        # no nvidia-smi: empty summaries
                self.proc = None
            f.close()
        self.path = path
        self._fh = open(path)
        self._partial = ""

    def _read(self):
        chunk = self._fh.read()
        if not chunk:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()           # an unfinished last line waits for the next read
        for line in lines:
            s = parse_sample(line)
            if s is not None and (not self._times or s[0] >= self._times[-1]):
                self.samples.append(s)
                self._times.append(s[0])

    def window(self, t0, t1):
        """The summary of the samples stamped in ``[t0, t1]`` (``time.time()`` values)."""
        self._read()
        lo, hi = bisect.bisect_left(self._times, t0), bisect.bisect_right(self._times, t1)
        return summarize(self.samples[lo:hi])

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None
        self._read()
        self._fh.close()
        if self._temporary:
            os.unlink(self.path)
