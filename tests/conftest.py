"""Eight simulated CPU devices, set before jax is imported anywhere in the test session; and one
compilation cache for the session."""
import atexit
import os
import shutil
import tempfile

# XLA:CPU aborts a process whose in-process collective waits too long for a device's thread:
# under the suite's load, test_restore_onto_another_mesh's 8 devices did, once after 40 s (the
# termination timeout), and once more with that at 300 s, in a suite only 35 s slower than a
# passing one (2026-11-27; not reproduced alone, nor beside three busy loops). So the
# collectives' own timeout is raised too, as `--devices` does; not confirmed as the cause.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=300"
                           " --xla_cpu_collective_timeout_seconds=300"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=60").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `headwise` processes tests start compile the same few tiny programs: one persistent
# compilation cache (train/compile_cache.py), in a folder of this session's own, compiles each
# once. The user's cache folder is left alone and nothing outlives the session. Not this
# process's own compiles: across its 8 CPU devices, programs loaded from the cache sometimes
# deadlock in their collectives (compile_cache.unsafe_here).
if "HEADWISE_COMPILE_CACHE" not in os.environ:
    _folder = tempfile.mkdtemp(prefix="headwise-tests-jax-compile-")
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    os.environ["HEADWISE_COMPILE_CACHE"] = _folder
