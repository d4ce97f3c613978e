"""The named parts a ranker is composed of (STYLE R10).

- :mod:`models.arch.sequence`: long-sequence modules (SDIM sampling, DARE search).
- :mod:`models.arch.attention`: target attention (DIN activation unit with Dice, DiffuMIN).
- :mod:`models.arch.over`: the MLP head.
- :mod:`models.arch.layers`: shared layers (Dice, MLP, embeddings).
"""

from models.arch.attention import DiffuMINArch, DINAttention
from models.arch.layers import MLP, Dice, ItemEmbedding
from models.arch.over import OverArch
from models.arch.sequence import DARESequenceArch, SDIMSequenceArch

__all__ = [
    "DARESequenceArch",
    "DINAttention",
    "Dice",
    "DiffuMINArch",
    "ItemEmbedding",
    "MLP",
    "OverArch",
    "SDIMSequenceArch",
]
