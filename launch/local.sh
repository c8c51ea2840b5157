#!/bin/sh
# N processes of vit_jax.main on this machine over gloo; see launch/local.py for the flags.
# Uses $PYTHON, else the repository's .venv, else python3.
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
if [ -z "$PYTHON" ]; then
  PYTHON=python3
  [ -x "$root/.venv/bin/python" ] && PYTHON="$root/.venv/bin/python"
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" "$here/local.py" "$@"
