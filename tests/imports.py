"""What a command imported, read from the stderr of `python -X importtime -m ...`: the checks
that report mistakes before the heavy libraries (TensorFlow: ~6 s on 2 cores) load."""
import re

IMPORTTIME = ('-X', 'importtime')


def imported(stderr: str, package: str) -> bool:
  return bool(re.search(rf'^import time: .*\|\s+{re.escape(package)}$', stderr, re.M))
