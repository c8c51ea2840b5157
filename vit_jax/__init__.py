"""vit_jax: Vision Transformers in JAX/Flax, from a laptop CPU to TPU pods."""
from vit_jax import host_allocator
from vit_jax import host_devices

# First thing, before jax or tensorflow start threads: see host_allocator's docstring.
HOST_ALLOCATOR_TUNED = host_allocator.keep_freed_memory()
HUGE_PAGE_HEAP_BYTES = host_allocator.advise_huge_pages() if HOST_ALLOCATOR_TUNED else 0
# Before jax's CPU backend starts: see host_devices' docstring.
CPU_DEVICES_SET = host_devices.split_cpu()
