"""One line naming the machine a benchmark ran on: CPU model, vector extensions, cores, devices."""
import os
import platform

_EXTENSIONS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "neon",
               "asimd", "sve")


def cpu() -> str:
    """'Intel(R) Xeon(R) ... (avx2 avx512f ...), 2 cores' from /proc/cpuinfo where there is one."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                if key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform's own name, extensions unknown
        pass
    model = model or platform.processor() or platform.machine()
    found = " ".join(e for e in _EXTENSIONS if e in flags) or "extensions unknown"
    return f"{model} ({found}), {len(os.sched_getaffinity(0))} cores"


def versions(*names: str) -> str:
    """'jax 0.10.2, torch 2.13.0' for the modules named that can be imported."""
    out = []
    for name in names:
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def describe(*modules: str) -> str:
    """CPU, load average, the accelerator jax uses (if any) and library versions."""
    import jax
    device = jax.devices()[0]
    accel = "" if device.platform == "cpu" else f"; device: {device.device_kind}"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"cpu: {cpu()}; load {load}{accel}; {versions('jax', *modules)}"
