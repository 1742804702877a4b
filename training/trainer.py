"""The Trainer: the model, the optimizer, the compiled train step and the evaluation of one run.

The plain path, in the shape of mlx-examples: ``loss_and_correct`` on the model, ``nn.value_and_grad``,
one ``mx.compile``d step over ``[model.state, optimizer.state, mx.random.state]`` (dropout draws random
numbers inside it). ``training.speed.FastTrainer`` is the same interface, faster on Linux CPUs.
"""
import contextlib
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_unflatten

import models
from config import Config
from optimizers import build_optimizer

EVAL_CHUNK = 2048  # rows per evaluation forward pass: fewer, larger kernels


def loss_and_correct(logits: mx.array, y: mx.array):
    """Summed cross-entropy and the number of correct predictions."""
    return nn.losses.cross_entropy(logits, y, reduction="sum"), mx.sum(mx.argmax(logits, axis=1) == y)


class Trainer:
    """``step`` / ``steps`` train; ``evaluator(x, y)()`` evaluates; every result is a lazy array."""

    def __init__(self, cfg: Config, optimizer: Optional[optim.Optimizer] = None):
        """``optimizer``: use this one instead of building ``cfg.optim`` (tests)."""
        mx.random.seed(cfg.seed)  # same seed and model config -> same initial weights for every optimizer
        self.model = model = models.Transformer(cfg.model, cfg.data.vocab_size)
        self.optimizer = optimizer = optimizer or build_optimizer(cfg.optim)
        optimizer.init(model.trainable_parameters())  # before compiling, so the step traces once
        self.state = [model.state, optimizer.state, mx.random.state]

        def mean_loss(model, x, y):
            loss, correct = loss_and_correct(model(x), y)
            return loss / x.shape[0], (loss, correct)

        loss_and_grad = nn.value_and_grad(model, mean_loss)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(x, y):
            (_, (loss, correct)), grads = loss_and_grad(model, x, y)
            optimizer.update(model, grads)
            return loss, correct

        self._step = step
        self._evaluate = mx.compile(lambda x, y: loss_and_correct(model(x), y), inputs=model.state)

    def running(self):
        """A context around the whole of training (platform settings; none here)."""
        return contextlib.nullcontext()

    def step(self, x, y):
        """One optimizer step on the batch ``(x, y)``: its summed loss and correct count."""
        return self._step(x, y)

    def steps(self, x, y, order: mx.array, batch_size: int, totals=None):
        """One step per batch of ``(x, y)`` rows taken in ``order``: ``totals`` (the summed loss and correct
        count so far, default zero) plus theirs. Steps are queued, not waited for."""
        loss_sum, correct_sum = totals or (mx.array(0.0), mx.array(0))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss, correct = self.step(x[idx], y[idx])
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
            mx.async_eval(self.state, loss_sum, correct_sum)
        return loss_sum, correct_sum

    def load_state(self, parameters: dict, optimizer_state: dict) -> None:
        """Continue from saved ``parameters`` (flat, by name) and ``optimizer_state`` (a tree)."""
        self.model.update(tree_unflatten(list(parameters.items())))
        self.optimizer.state = optimizer_state
        self.state[1] = self.optimizer.state  # the compiled step reads the state through this list

    @contextlib.contextmanager
    def eval_mode(self):
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def evaluator(self, x, y):
        """A function of no arguments returning the summed loss and correct count over ``(x, y)``
        (dropout off), prepared once for an evaluation set that is evaluated many times."""
        def evaluate():
            with self.eval_mode():
                totals = [self._evaluate(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
                          for i in range(0, len(y), EVAL_CHUNK)]
            return tuple(sum(t[k] for t in totals) for k in range(2))
        return evaluate
