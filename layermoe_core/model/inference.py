"""How every measurement runs a model: eval mode without autograd, with forward hooks held for the call only.

Evaluation, similarity, the other papers' signals and the routing statistics all read a model
this way, and leave its training flag and its hooks as they found them, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


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
