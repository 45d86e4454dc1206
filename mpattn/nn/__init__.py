"""Neural-network layers: radial bases and cutoffs, message passing, attention (with its
smooth mode), electrostatics, updates, readouts, embeddings, spherical harmonics and the
Euclidean transformer's equivariant attention.

Pure functions take arrays and keyword-only graph indices (``*, senders, receivers,
num_segments``); the Flax NNX modules only hold parameters and call them (docs/design.md).
Every name of the submodules' ``__all__`` is available here (``from mpattn.nn import
SumReadout``).
"""

from mpattn.nn import (
    attention,
    electrostatics,
    embed,
    euclidean,
    message,
    radial,
    readout,
    spherical,
    update,
)
from mpattn.nn.attention import *  # noqa: F403
from mpattn.nn.electrostatics import *  # noqa: F403
from mpattn.nn.embed import *  # noqa: F403
from mpattn.nn.euclidean import *  # noqa: F403
from mpattn.nn.message import *  # noqa: F403
from mpattn.nn.radial import *  # noqa: F403
from mpattn.nn.readout import *  # noqa: F403
from mpattn.nn.spherical import *  # noqa: F403
from mpattn.nn.update import *  # noqa: F403

__all__ = [name for module in (attention, electrostatics, embed, euclidean, message, radial,
                               readout, spherical, update) for name in module.__all__]
