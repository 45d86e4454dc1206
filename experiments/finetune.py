"""``--init-from WORKDIR``: fine-tune a trained potential on other data.

The new run starts from the trained run's parameters; its model config must be the same
(sizes, cutoff, heads). The per-element reference energies are fitted on the new training
frames as for any run, so elements the trained run never saw get their own reference
energies; their embedding rows are those of the trained run's initialisation, which its
training never changed (no atom of theirs was in its data), i.e. fresh ones. An element
beyond the model's embedding table cannot be taken: that is an error before training.
``--train-only-readout`` freezes all but the readout (``TrainConfig.trainable``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["initial_params"]


def initial_params(workdir, model_config, data, log=print):
    """The ``nnx.Param`` state of ``workdir``'s best checkpoint, checked against the new
    run's ``model_config`` and the elements of its ``data``.

    Raises:
        ValueError: the workdir holds no potential, the model configs differ (the message
            lists the fields), or the data holds an element the model cannot embed.
    """
    from flax import nnx

    from mpattn.elements import symbols
    from mpattn.potential import Potential
    from mpattn.train.runs import load_run

    trained = load_run(workdir)
    if not isinstance(trained, Potential):
        raise ValueError(f"--init-from {workdir}: a property model's run, not a potential's")
    old = trained.model.config
    if type(old) is not type(model_config):
        raise ValueError(f"--init-from {workdir}: its model is a {type(old).__name__}, this "
                         f"run's a {type(model_config).__name__} (choose the same --model)")
    differ = [f.name for f in dataclasses.fields(old)
              if getattr(old, f.name) != getattr(model_config, f.name)]
    if differ:
        shown = ", ".join(f"{k}: {getattr(old, k)!r} there, {getattr(model_config, k)!r} here"
                          for k in differ)
        raise ValueError(f"--init-from {workdir}: the model config differs ({shown}); give "
                         "the same --model-config and --cutoff")
    max_z = getattr(old, "max_z", None)
    beyond = [z for z in data.elements if max_z is not None and z > max_z]
    if beyond:
        raise ValueError(f"--init-from {workdir}: element(s) {symbols(beyond)} of the data "
                         f"are beyond the model's embedding table (max_z {max_z})")
    new = sorted(set(data.elements) - set(trained.elements))
    log(f"--init-from {workdir}: parameters of its best checkpoint; elements "
        f"{symbols(trained.elements)} trained there" + (
            f", {symbols(new)} new (fresh embeddings, reference energies fitted here)"
            if new else ""))
    return nnx.state(trained, nnx.Param)
