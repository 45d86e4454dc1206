"""Neural-network layers: radial bases and cutoffs, message passing, attention, updates,
readouts and embeddings.

Pure functions take arrays and keyword-only graph indices (``*, senders, receivers,
num_segments``); the Flax NNX modules only hold parameters and call them (DESIGN.md).
"""

from mpattn.nn.attention import EDGE_BIASES, MultiHeadGraphAttention, graph_attention
from mpattn.nn.embed import (
    AtomEmbedding,
    add_positional_encoding,
    atom_index_in_graph,
    sinusoidal_encoding,
)
from mpattn.nn.message import (
    CFConv,
    EdgeNetwork,
    Interaction,
    cfconv,
    dense_layout,
    edge_network_dense,
    edge_network_plain,
    shifted_softplus,
)
from mpattn.nn.radial import (
    BesselRBF,
    GaussianRBF,
    bessel_basis,
    cosine_cutoff,
    edge_distances,
    gaussian_basis,
    polynomial_cutoff,
)
from mpattn.nn.readout import (
    AttentionReadout,
    Set2Set,
    SumReadout,
    graph_cross_attention,
    mean_readout,
    sum_readout,
)
from mpattn.nn.update import ACTIVATIONS, GRUUpdate, TransformerEncoderUpdate

__all__ = [
    # attention
    "EDGE_BIASES",
    "MultiHeadGraphAttention",
    "graph_attention",
    # embed
    "AtomEmbedding",
    "add_positional_encoding",
    "atom_index_in_graph",
    "sinusoidal_encoding",
    # message
    "CFConv",
    "EdgeNetwork",
    "Interaction",
    "cfconv",
    "dense_layout",
    "edge_network_dense",
    "edge_network_plain",
    "shifted_softplus",
    # radial
    "BesselRBF",
    "GaussianRBF",
    "bessel_basis",
    "cosine_cutoff",
    "edge_distances",
    "gaussian_basis",
    "polynomial_cutoff",
    # readout
    "AttentionReadout",
    "Set2Set",
    "SumReadout",
    "graph_cross_attention",
    "mean_readout",
    "sum_readout",
    # update
    "ACTIVATIONS",
    "GRUUpdate",
    "TransformerEncoderUpdate",
]
