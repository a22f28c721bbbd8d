"""Presets: one file per named config, each with ``get_config() -> moela.configs.Config``; ``--config
NAME`` loads ``NAME.py`` from here (``moela.configs.loader.load_preset``)."""
