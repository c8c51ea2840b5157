#!/usr/bin/env bash
# ViT-B/16 bf16 on one GPU, in one go (issue #8's accelerator row): the cuDNN attention tests,
# then the bench's train step at batch 256 (with a profile of its ops after the timed steps),
# batch 512, and the eval step. Each result is
# OUTDIR/NAME.json, their logs one OUTDIR/bench.log, the trace OUTDIR/profile.xplane.pb.gz
# (the device tool returns at most 8 files); a table and the profile's top ops are printed last.
# The xla-vs-cuDNN attention pair and dropout's cost (none) were measured once
# (docs/performance.md, "The H200"); rerun them with --config.model_overrides.attention_impl=xla
# and --config.model_overrides.dropout_rate=0.0.
#
#   launch/gpu_bench.sh OUTDIR [WHEEL_DIR]
#
# Runs from the repository root whatever the current directory (OUTDIR and WHEEL_DIR are taken
# from it first); stops in one line unless jax's backend is a GPU. The machine's python3 needs
# jax with CUDA, flax, optax, einops, absl-py and PyYAML (no TensorFlow, no dataset); missing
# wheels (ml-collections on the lent H200 image) are installed from WHEEL_DIR into /tmp/site
# (docs/performance.md). Every step runs even if one fails; the exit status is 1 if any did.
set -euo pipefail
usage='usage: launch/gpu_bench.sh OUTDIR [WHEEL_DIR]'
out=${1:?$usage}
wheels=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -z "$wheels" ] || wheels=$(cd "$wheels" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
backend=$(python3 -c 'import jax; print(jax.default_backend())')
if [ "$backend" != gpu ]; then
  echo "gpu_bench.sh: error: jax runs on $backend here, not a GPU: run on a machine with one" \
    "and jax with CUDA" >&2
  exit 1
fi
failed=
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices())'
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k cudnn -rs 2>&1 |
  tee "$out/test_cudnn.log" | tail -3 || failed="$failed test_cudnn"

bench() {
  local name=$1 rc=0
  shift
  timeout 150 python3 -m vit_jax.bench --config=configs/vit_b16.py --num_classes=1000 \
    --config.dtype=bfloat16 --json "$@" >"$out/$name.json" 2>"$out/$name.err" || rc=$?
  echo "$name: rc $rc"
  [ "$rc" = 0 ] || { tail -n 15 "$out/$name.err"; failed="$failed $name"; }
  { echo "=== $name (rc $rc)"; cat "$out/$name.err"; } >>"$out/bench.log"
  rm -f "$out/$name.err"
}
bench train_b256_auto --config.batch=256 --profile_dir=/tmp/vit_profile
# The trace this bench wrote (its JSON names it), not whichever is newest in the folder.
trace=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().strip()
  .splitlines()[-1])["trace"])' "$out/train_b256_auto.json") &&
  gzip -c "$trace" >"$out/profile.xplane.pb.gz" || failed="$failed profile"
bench train_b512_auto --config.batch=512
bench eval_b1024_auto --what=eval --config.batch_eval=1024

python3 - "$out" <<'EOF' || failed="$failed table"
import json, pathlib, sys
print(f'{"run":20} {"img/s":>8} {"MFU":>6} {"vs matmul":>9} {"step ms":>8} {"compile s":>9} '
      f'{"GiB":>6} cuDNN attention')
for path in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
  try:
    r = json.loads(path.read_text().strip().splitlines()[-1])
  except (ValueError, IndexError):
    print(f'{path.stem:20} failed: see bench.log')
    continue
  print(f'{path.stem:20} {r["img_per_sec"]:8.0f} {r.get("mfu_vs_nominal", float("nan")):6.1%} '
        f'{r["mfu_vs_measured_matmul"]:9.1%} {1e3 * r["step_s_median"]:8.1f} '
        f'{r["compile_s"]:9.1f} {r["peak_memory_gib"]:6.1f} {r.get("cudnn_attention")}')
  if 'top_ops' in r:
    from vit_jax.training import profiling
    print(profiling.format_summary(r['top_ops']))
EOF
if [ -n "$failed" ]; then
  echo "gpu_bench.sh: error: failed:$failed (logs in $out)" >&2
  exit 1
fi
