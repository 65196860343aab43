"""Eight simulated CPU devices, set before jax is imported anywhere in the test session."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile afresh and leave the user's cache folder alone (train/compile_cache.py).
os.environ.setdefault("HEADWISE_COMPILE_CACHE", "off")
