"""Batch generation: ``python serve.py --checkpoint DIR --prompts IN.jsonl --out OUT.jsonl [...]``.

A thin entry point (also installed as ``moela-serve``); see ``moela/cli/serve.py``.
"""

from moela.cli.serve import entry

if __name__ == "__main__":
    entry()
