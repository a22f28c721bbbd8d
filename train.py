"""Train a moela model: ``python train.py --config <preset or FILE.py> [--set key=value ...]``.

A thin entry point (also installed as ``moela-train``); see ``moela/cli/train.py``.
"""

from moela.cli.train import entry

if __name__ == "__main__":
    entry()
