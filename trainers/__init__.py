"""Everything that learns: data, models, metrics, decoding, training loops.

`trainers` imports nothing from `services` or `cluster`; models import only torch.
"""

__version__ = "0.1.0"
