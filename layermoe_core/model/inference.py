"""How every measurement runs a model: eval mode without autograd, with forward hooks held for the call only.

Evaluation, similarity, the other papers' signals and the routing statistics all read a model
this way, and leave its training flag and its hooks as they found them, whatever happens. A
model may be dispatched over devices (`checkpoints.load_model` with a device_map): its inputs
go to `input_device`, and what a hook keeps is moved to one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the device its input embedding runs on.

    On a dispatched model the first parameter may sit on another device, or on the meta device when
    it is offloaded; accelerate's hook on the embedding then names the device it runs on. A module that
    is not a transformers model (no input embedding to ask) takes its inputs where its first parameter is.
    """
    if not hasattr(model, "get_input_embeddings"):
        return next(model.parameters()).device
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    for one in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if getattr(one, "execution_device", None) is not None:
            return torch.device(one.execution_device)
    return embedding.weight.device


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no balance loss) and no autograd, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def forward_pre_hooks(hooks: Iterable[tuple[nn.Module, Callable[[nn.Module, tuple], None]]]) -> Iterator[None]:
    """Each (module, hook) registered as a forward pre-hook (it sees the module's inputs) until the block ends."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
