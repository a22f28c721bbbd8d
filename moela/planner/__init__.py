"""Planning a run before it runs: per-device memory (``memory``) of a config on a mesh, computed
abstractly. ``python -m moela.planner --config ... --mesh data=..,tensor=..,sequence=..``."""
