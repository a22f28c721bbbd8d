"""``python -m moela.planner``: memory plan, step time, ``--search`` (see ``moela.planner.cli``)."""

import sys

from moela.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
