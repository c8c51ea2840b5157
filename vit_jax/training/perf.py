"""Hardware peaks and utilisation figures, shared by the training loop and the benchmark."""
import re
from typing import Optional

import jax

from vit_jax import host_devices

# Nominal dense bf16 peak TFLOP/s per device (one chip; for v4/v5p one chip = one jax device).
PEAK_TFLOPS_BF16 = {
    'TPU v4': 275., 'TPU v5 lite': 197., 'TPU v5e': 197., 'TPU v5p': 459., 'TPU v5': 459.,
    'TPU v6 lite': 918., 'TPU v6e': 918.,
    'A100': 312., 'H100': 989., 'H200': 989.,
}


def device_peak_tflops(device: Optional[jax.Device] = None) -> Optional[float]:
  """The nominal bf16 peak of the device kind, or None where unknown (CPUs among them)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in sorted(PEAK_TFLOPS_BF16.items(), key=lambda kv: -len(kv[0])):
    if re.search(re.escape(name), kind, re.IGNORECASE):
      return peak
  return None


def cores() -> int:
  """Accelerator devices, or on CPU the cores (logical CPUs) every process may run on: its own
  times the process count (processes on one machine share none under launch/local.sh, which
  gives each its own)."""
  if jax.default_backend() == 'cpu':
    return host_devices.schedulable_cores() * jax.process_count()
  return jax.device_count()


def compute_units() -> int:
  """What "per device" divides by: a device, or on CPU a whole process, whose (forced) host
  devices share one pool of the machine's cores (what one matmul-peak probe saturates)."""
  return jax.process_count() if jax.default_backend() == 'cpu' else jax.device_count()


def throughput_metrics(images: int, seconds: float, flops_per_image: float) -> dict[str, float]:
  """img/s, per core, achieved TFLOP/s per device (`compute_units`) and MFU against the
  nominal peak if known."""
  img_per_sec = images / seconds
  tflops = img_per_sec * flops_per_image / 1e12 / compute_units()
  metrics = {'perf/img_per_sec': img_per_sec, 'perf/img_per_sec_per_core': img_per_sec / cores(),
             'perf/tflops_per_device': tflops}
  peak = device_peak_tflops()
  if peak:
    metrics['perf/mfu'] = tflops / peak
  return metrics
