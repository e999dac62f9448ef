"""The loop's building blocks on their own: one DataLoader iterator per pass, settings honoured."""
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
