"""tiny_mtp: ``tiny`` with one multi-token-prediction module, served with two MTP drafts a step.

Trains in about the time of ``tiny`` (the module is one more block) and is the quickest way to see
DeepSeek-V3's MTP objective (``mtp_loss_1`` in the metrics) and speculative decoding end to end.
"""

import dataclasses

from moela.configs.presets.tiny import get_config as tiny
from moela.configs.schema import Config


def get_config() -> Config:
    base = tiny()
    return dataclasses.replace(
        base,
        name="tiny_mtp",
        model=dataclasses.replace(base.model, mtp_depth=1),
        train=dataclasses.replace(base.train, mtp_loss_weight=0.3, out_dir="runs/tiny_mtp"),
        serve=dataclasses.replace(base.serve, speculative_tokens=2),
    )
