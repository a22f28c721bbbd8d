"""Model families for ``python -m scaling plan --family configs/families/<name>.py`` (see ``scaling.family``)."""
