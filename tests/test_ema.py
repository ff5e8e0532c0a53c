"""The student's weight average (`ema_decay` of every trainer section): what the average is and that a resumed
training ends on the same average (tests/test_stage1.py: the setting reaches a stage's LoRA and fingerprint)."""

from __future__ import annotations

import pytest
import torch

from tlcm_core.config import TrainerConfig
from tlcm_core.progress import SilentReporter
from tlcm_core.store import ArtifactStore
from tlcm_core.training import CheckpointIO, EmaWeights, ParamWeights, TrainState, make_optimizer, train


class Quadratic:
    """Fits w to a fixed random target by SGD-noisy steps; records the weights after every optimiser step."""

    def __init__(self, w: torch.nn.Parameter, stop_at: int | None = None):
        self.w, self.stop_at, self.seen = w, stop_at, []
        self.target = torch.randn(8, generator=torch.Generator().manual_seed(1))

    def batches(self, start: int):
        for k in range(start, 10_000):
            yield torch.randn(8, generator=torch.Generator().manual_seed(k))

    def loss(self, noise):
        return {"fit": ((self.w - self.target - 0.3 * noise) ** 2).mean()}

    def after_step(self, batch, sync):
        self.seen.append(self.w.detach().clone())
        if self.stop_at is not None and len(self.seen) == self.stop_at:
            raise KeyboardInterrupt("stopped from inside, as a preemption")
        return {}


def _train(art, tcfg: TrainerConfig, stop_at: int | None = None):
    w = torch.nn.Parameter(torch.zeros(8))
    weights = ParamWeights({"w": w})
    state = TrainState({"student": weights}, {"student": make_optimizer(weights.parameters(), tcfg)})
    objective = Quadratic(w, stop_at)
    train(objective, state, tcfg, name="t", ckpt=CheckpointIO(art), reporter=SilentReporter(),
          device=torch.device("cpu"))
    return w.detach().clone(), objective.seen


def test_the_final_weights_are_the_average_of_the_steps(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    tcfg = TrainerConfig(iterations=40, lr=0.05, ema_decay=0.9, checkpoint_every=1000, log_every=10)
    final, seen = _train(store.artifact("t", "ema"), tcfg)
    expected = torch.zeros(8)  # the starting weights
    for n, w in enumerate(seen):
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(final, expected)
    assert not torch.allclose(final, seen[-1], atol=1e-3)  # an average, not the last step's weights
    plain, seen_plain = _train(store.artifact("t", "plain"), tcfg.model_copy(update={"ema_decay": 0.0}))
    torch.testing.assert_close(plain, seen_plain[-1])  # without it: the last step's weights, as always
    torch.testing.assert_close(torch.stack(seen), torch.stack(seen_plain))  # averaging never steers the steps


def test_a_resumed_training_ends_on_the_same_average(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    tcfg = TrainerConfig(iterations=30, lr=0.05, ema_decay=0.8, checkpoint_every=10, log_every=5)
    art = store.artifact("t", "resumed")
    with pytest.raises(KeyboardInterrupt):
        _train(art, tcfg, stop_at=25)  # after the checkpoint at step 20
    resumed, seen = _train(art, tcfg)
    assert len(seen) == 10  # steps 21-30 only: the run went on from its checkpoint
    straight, _ = _train(store.artifact("t", "straight"), tcfg)
    torch.testing.assert_close(resumed, straight)


def test_ema_weights_refuse_a_checkpoint_of_other_tensors():
    ema = EmaWeights({"a": torch.nn.Parameter(torch.zeros(2))}, 0.9)
    with pytest.raises(KeyError, match="keys differ"):
        ema.load_state_dict({"b": torch.zeros(2)})
