"""vit_jax: Vision Transformers in JAX/Flax, from a laptop CPU to TPU pods."""
from vit_jax import errors
from vit_jax import host_allocator
from vit_jax import host_devices

# Before anything imports jax: a non-numeric JAX_NUM_CPU_DEVICES stops `import jax` itself with
# a traceback, and a zero count stops jax's backend (or XLA aborts) later. One line instead.
DEVICE_COUNT_MISTAKE = host_devices.device_count_mistake()
if DEVICE_COUNT_MISTAKE:
  errors.exit_with(DEVICE_COUNT_MISTAKE)

# First thing, before jax or tensorflow start threads: see host_allocator's docstring.
HOST_ALLOCATOR_TUNED = host_allocator.keep_freed_memory()
HUGE_PAGE_HEAP_BYTES = host_allocator.advise_huge_pages() if HOST_ALLOCATOR_TUNED else 0
# Before jax's CPU backend starts: see host_devices' docstring.
CPU_DEVICES_SET = host_devices.split_cpu()
