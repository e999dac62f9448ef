"""The loop's building blocks on their own: one DataLoader iterator per pass, settings honoured."""
import math

import torch

from train_seg.engine.loop import LoopSettings, train_one_epoch
from train_seg.evaluation.loop import evaluate, predict_batch


class CountingLoader:
    """A loader that counts how often it is iterated (each iter() of a DataLoader starts its workers anew)."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Conv1x1(torch.nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)) for _ in range(n)]


def test_each_pass_iterates_the_loader_once_with_or_without_progress_bars():
    for progress in (True, False):
        settings = LoopSettings(device=torch.device("cpu"), progress=progress, log_every=2)
        model = Conv1x1()
        loader = CountingLoader(_batches())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step, loss = train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, None, scaler, loader, settings,
                                     epoch=0, global_step=0)
        assert (step, loader.iterations) == (3, 1) and loss > 0
        loader = CountingLoader(_batches())
        confusion = evaluate(model, loader, 3, settings)
        assert loader.iterations == 1 and int(confusion.matrix.sum()) == 3 * 2 * 8 * 8


def test_predict_batch_is_the_model_output_under_the_settings():
    model = Conv1x1().eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = model(images)["out"]
        assert torch.equal(predict_batch(model, images, torch.device("cpu")), expected)
        bf16 = predict_batch(model, images, torch.device("cpu"), torch.bfloat16, channels_last=True)
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), expected, atol=0.05)


# -- fp16 autocast + GradScaler (trainer.precision=16-mixed), run on the CPU ----------------------------------------
def _fp16_run(model, batches, init_scale: float, grad_clip=None, lr=0.1, backoff_factor=0.5):
    settings = LoopSettings(device=torch.device("cpu"), amp_dtype=torch.float16, grad_clip=grad_clip, log_every=1,
                            progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff_factor, growth_interval=1000)
    logged = []
    step, loss = train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, None, scaler, batches, settings,
                                 epoch=0, global_step=0, on_log=lambda scalars, s: logged.append(scalars))
    return step, loss, logged, scaler


def test_fp16_steps_scale_the_loss_update_the_weights_and_stay_finite():
    torch.manual_seed(0)
    model = Conv1x1()
    before = [p.detach().clone() for p in model.parameters()]
    step, loss, logged, scaler = _fp16_run(model, _batches(3), init_scale=2.0 ** 10)
    assert step == 3 and math.isfinite(loss) and all(math.isfinite(s["train/loss"]) for s in logged)
    assert [s["train/skipped_steps"] for s in logged] == [0, 0, 0]
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 10  # no overflow, no growth yet
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_is_counted():
    torch.manual_seed(0)
    model = Conv1x1()
    batches = _batches(2)
    before = [p.detach().clone() for p in model.parameters()]
    # a loss scale far beyond the fp16 range: the scaled gradients overflow to inf in the fp16 backward
    _, _, logged, scaler = _fp16_run(model, batches[:1], init_scale=2.0 ** 40)
    assert logged == []  # an epoch of skipped steps: no loss to log
    assert scaler.get_scale() == 2.0 ** 39  # backoff_factor 0.5
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no weight changed
    # step 1 overflows and lowers the scale to 2**10, step 2 updates; the skipped step is counted like any other
    step, loss, logged, scaler = _fp16_run(model, batches, init_scale=2.0 ** 30, backoff_factor=2.0 ** -20)
    assert step == 2 and scaler.get_scale() == 2.0 ** 10 and math.isfinite(loss)
    assert [s["train/skipped_steps"] for s in logged] == [1]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fp16_gradient_clipping_sees_the_unscaled_gradients():
    """One clipped SGD step through the loop (loss scale 2**12) equals the step computed by hand from the unscaled
    fp16-autocast gradients: a clip of the scaled gradients would shrink the update 4096 times more."""
    torch.manual_seed(0)
    model, manual = Conv1x1(), Conv1x1()
    manual.load_state_dict(model.state_dict())
    batches = _batches(1)
    clip, lr = 0.05, 0.1
    _fp16_run(model, batches, init_scale=2.0 ** 12, grad_clip=clip, lr=lr)

    images, targets = batches[0]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(manual(images)["out"], targets)
    loss.backward()
    grads = [p.grad for p in manual.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > clip  # the clip is active
    factor = clip / (float(norm) + 1e-6)
    with torch.no_grad():
        expected = [p - lr * factor * g for p, g in zip(manual.parameters(), grads)]
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)
