"""``python -m moela.planner``: the per-device memory plan (see ``moela.planner.memory``)."""

import sys

from moela.planner.memory import main

if __name__ == "__main__":
    sys.exit(main())
