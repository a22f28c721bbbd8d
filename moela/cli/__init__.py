"""Entry points: ``train.py`` and ``serve.py`` at the repository root (and the ``moela-train`` /
``moela-serve`` console scripts) call ``main`` here. Each parses its arguments, wires the layers
below together and runs the loop; the logic a test wants lives in those layers."""
