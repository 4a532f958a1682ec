import os

# Tests run on CPU with the default float32 precision; keep XLA from grabbing
# every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
