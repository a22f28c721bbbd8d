"""Model families for ``python -m moela.scaling plan --family <name>`` (see ``scaling.family``)."""
