"""Child process of :func:`exporter.latency.peak_memory_mb`: ``python -m exporter.memory_probe MODEL PROVIDER FEEDS``.

Imports only numpy and onnxruntime (what a serving process holds), notes the resident memory, opens one session
on PROVIDER, runs the feeds of FEEDS (an .npz) twice, and prints the peak resident bytes the session added. This
is host memory: on a GPU provider it includes the CUDA context and not the device's own memory.
"""

from __future__ import annotations

import sys

import numpy as np

from graphs.core.sessions import open_session


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{field} not in /proc/self/status")


def probe(path: str, provider: str, inputs: str) -> int:
    with np.load(inputs) as data:
        feeds = {name: data[name] for name in data.files}
    try:  # start the peak mark here, so imports and loading the feeds do not count (Linux clear_refs 5)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass
    baseline = status_bytes("VmRSS")
    session = open_session(path, provider)
    names = {i.name for i in session.get_inputs()}
    for _ in range(2):
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    return status_bytes("VmHWM") - baseline


if __name__ == "__main__":
    print(probe(*sys.argv[1:4]))
