"""Speed settings (train_seg.engine.runtime): the documented worker / thread rule for faked core counts, torch.compile with
its fallback at every moment it can fail, and each fast path training a few steps with finite losses."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from train_seg.engine import runtime as perf
from train_seg.engine.loop import LoopSettings, train_one_epoch
from train_seg.losses import CrossEntropyLoss
from train_seg.evaluation.metrics import predictions
from train_seg.models.deeplabv3 import build_deeplabv3
from train_seg.models.tiny import TinySegmenter

CPU = torch.device("cpu")
ARCH = "deeplabv3_mobilenet_v3_large"


# -- workers and threads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_auto_workers_for_file_datasets_is_half_the_cores_between_1_and_4(cores, expected):
    assert perf.resolve_num_workers("auto", cores=cores, dataset_kind=perf.FILES) == expected


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_auto_workers_for_in_memory_data_is_0(cores):
    assert perf.resolve_num_workers("auto", cores=cores, dataset_kind=perf.MEMORY) == 0


def test_explicit_workers_and_threads_are_kept():
    assert perf.resolve_num_workers(3, cores=2, dataset_kind=perf.MEMORY) == 3
    assert perf.resolve_num_workers(0, cores=8) == 0
    assert perf.resolve_num_threads(3, workers=1, cores=2) == 3
    assert perf.resolve_num_threads(None, workers=1, cores=2) is None  # torch's default, untouched


@pytest.mark.parametrize("cores, workers, expected", [(1, 0, 1), (2, 1, 2), (4, 2, 4), (8, 4, 8)])
def test_auto_threads_is_every_usable_core(cores, workers, expected):
    assert perf.resolve_num_threads("auto", workers=workers, cores=cores, environ={}) == expected


def test_auto_threads_follows_the_reserve_per_worker(monkeypatch):
    monkeypatch.setattr(perf, "CORES_RESERVED_PER_WORKER", 1)
    assert perf.resolve_num_threads("auto", workers=1, cores=2, environ={}) == 1
    assert perf.resolve_num_threads("auto", workers=4, cores=2, environ={}) == 1  # never below 1


def test_auto_threads_takes_omp_num_threads_when_set():
    assert perf.resolve_num_threads("auto", workers=1, cores=8, environ={"OMP_NUM_THREADS": "3"}) == 3
    assert perf.resolve_num_threads("auto", workers=0, cores=8, environ={"OMP_NUM_THREADS": "junk"}) == 8


def test_available_cores_applies_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(perf.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    assert perf.available_cores(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert perf.available_cores(cpu_max) == 4
    assert perf.available_cores(tmp_path / "absent") == 4
    cpu_max.write_text("800000 100000\n")  # a quota above the affinity mask changes nothing
    assert perf.available_cores(cpu_max) == 4


def test_dataset_kind_and_auto_workers_of_the_loaders(tmp_path):
    from _dataset_fixtures import write_voc
    from omegaconf import OmegaConf

    from train_seg.engine import builder as build
    from train_seg.data.base import SegmentationDataset
    from train_seg.data.synthetic import SyntheticShapes
    from train_seg.data.voc import VOCSegmentation

    synthetic = SyntheticShapes(split="train", num_train=4, num_val=2, image_size=32)
    voc = VOCSegmentation(root=write_voc(tmp_path).root, split="train")
    assert perf.dataset_kind(synthetic) == perf.MEMORY and perf.dataset_kind(voc) == perf.FILES

    class Wrapper(torch.utils.data.Dataset):  # like data.order.SeededSamples: forwards attributes
        def __init__(self, dataset):
            self.dataset = dataset

        def __getattr__(self, name):
            if name == "dataset":
                raise AttributeError(name)
            return getattr(self.dataset, name)

    wrapped = Wrapper(torch.utils.data.Subset(SegmentationDataset(synthetic), [0, 1]))
    assert perf.dataset_kind(wrapped) == perf.MEMORY
    assert perf.dataset_kind(Wrapper(SegmentationDataset(voc))) == perf.FILES
    trainer = OmegaConf.create({"num_workers": "auto", "pin_memory": "auto", "persistent_workers": False,
                                "batch_size": 2, "val_batch_size": 2})
    generator = torch.Generator().manual_seed(0)
    loader, _ = build.build_loaders(trainer, SegmentationDataset(synthetic), SegmentationDataset(synthetic), None,
                                    CPU, generator)
    assert loader.num_workers == 0
    loader, _ = build.build_loaders(trainer, SegmentationDataset(voc), SegmentationDataset(voc), None, CPU, generator)
    assert loader.num_workers == perf.resolve_num_workers("auto", dataset_kind=perf.FILES) >= 1


def test_config_accepts_auto_and_refuses_bad_counts(make_cfg):
    from train_seg.config.validation import ConfigError, validate_config

    cfg = make_cfg(tiny=False)
    assert cfg.trainer.num_workers == "auto" and cfg.trainer.compile is False and cfg.trainer.cudnn_benchmark is True
    validate_config(make_cfg("trainer.num_workers=auto", "trainer.num_threads=auto", "trainer.compile=true"))
    validate_config(make_cfg("trainer.num_workers=0", "trainer.num_threads=2"))
    for override in ("trainer.num_workers=2.5", "trainer.num_workers=many", "trainer.num_threads=0",
                     "trainer.num_threads=1.5"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            validate_config(make_cfg(override))


# -- torch.compile ----------------------------------------------------------------------------------------------
def _batches(n: int = 2, size: int = 64, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, size, size, generator=g), torch.randint(0, classes, (2, size, size), generator=g))
            for _ in range(n)]


def _train(model, batches, amp_dtype=None, channels_last=False):
    settings = LoopSettings(device=CPU, amp_dtype=amp_dtype, channels_last=channels_last, log_every=1, progress=False)
    model.to(memory_format=settings.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    logged = []
    step, loss = train_one_epoch(model, CrossEntropyLoss(), optimizer, None, scaler, batches, settings, epoch=0,
                                 global_step=0, on_log=lambda scalars, s: logged.append(scalars["train/loss"]))
    return step, loss, logged


def _model():
    torch.manual_seed(0)
    return build_deeplabv3(ARCH, 4)


def _fallback_lines(caplog):
    return [r.getMessage() for r in caplog.records if "trainer.compile=true" in r.getMessage()]


def test_compile_disabled_returns_the_model_untouched():
    model = _model()
    assert perf.maybe_compile(model, False) is model and not perf.is_compiled(model)


def test_compile_raising_at_setup_falls_back_with_one_warning(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", refuse)
    model = _model()
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        assert perf.maybe_compile(model, True) is model
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "Dynamo is not supported" in lines[0] and "\n" not in lines[0]
    assert not perf.is_compiled(model)
    step, loss, _ = _train(model, _batches(1))
    assert step == 1 and math.isfinite(loss)


def test_no_cpp_compiler_falls_back_before_compiling(monkeypatch, caplog):
    monkeypatch.setattr(perf.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compile must not be attempted"))
    model = _model()
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        perf.maybe_compile(model, True)
    assert "no C++ compiler" in " ".join(_fallback_lines(caplog)) and not perf.is_compiled(model)


class _RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("C++ compile error: inductor backward kernel")


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_compiled_call_failing_in_the_first_step_falls_back_and_changes_nothing(monkeypatch, caplog, failing):
    """Compilation is lazy: a compiler error comes in the first forward or the first backward. Either way the run
    goes on eagerly after one warning, and the probe left no trace: the weights after two steps equal those of an
    eager model trained the same way (BatchNorm statistics, gradients and RNG restored)."""

    def broken_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            if failing == "forward":
                raise RuntimeError("BackendCompilerFailed: inductor raised CppCompileError")
            out = fn(*a, **k)
            return {name: _RaisesInBackward.apply(t) for name, t in out.items()}

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = perf.maybe_compile(_model(), True)
    assert perf.is_compiled(model)
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        step, loss, _ = _train(model, _batches(2))
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "first compiled call" in lines[0]
    assert step == 2 and math.isfinite(loss) and not perf.is_compiled(model)
    eager = _model()
    _, eager_loss, _ = _train(eager, _batches(2))
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name


def test_compiled_model_keeps_the_plain_state_dict_keys():
    eager, compiled = _model(), perf.maybe_compile(_model(), True)
    keys = list(compiled.state_dict())
    assert keys == list(eager.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert [id(p) for p in compiled.parameters()] == [id(p) for _, p in compiled.named_parameters()]
    eager.load_state_dict(compiled.state_dict())  # a checkpoint of a compiled run loads into a plain model


def _tiny_segmenter():
    torch.manual_seed(0)
    return TinySegmenter(4)  # model=tiny: inductor compiles it in seconds (DeepLabV3 takes minutes cold on 2 cores)


def test_compile_true_trains_two_steps_where_the_platform_compiles(caplog):
    """The real torch.compile (inductor, g++) through train_one_epoch, on a tiny segmenter."""
    if perf.compile_blocker(CPU) is not None:
        pytest.skip(perf.compile_blocker(CPU))
    model = perf.maybe_compile(_tiny_segmenter(), True)
    with caplog.at_level(logging.WARNING, logger="train_seg"):
        step, loss, logged = _train(model, _batches(2))
    assert step == 2 and math.isfinite(loss) and all(math.isfinite(v) for v in logged)
    if not _fallback_lines(caplog):
        assert perf.is_compiled(model)
    assert not any("_orig_mod" in k for k in model.state_dict())


# -- fast paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype, channels_last", [(None, True), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["32+channels_last", "bf16-mixed", "bf16-mixed+channels_last"])
def test_fast_paths_train_a_few_steps_with_finite_losses(amp_dtype, channels_last):
    step, loss, logged = _train(_model(), _batches(3), amp_dtype=amp_dtype, channels_last=channels_last)
    assert step == 3 and len(logged) == 3 and all(math.isfinite(v) for v in logged) and math.isfinite(loss)


def test_skip_padding_taps_trains_like_the_plain_model():
    """model.skip_padding_taps only changes how the convs compute: float64 training of the same initial weights on
    the same batches gives the same losses and weights (at 64 px the ASPP map is 4 x 4, so its three 3x3 branches
    are 1x1 convs). float64, so that summation order (threads, kernels) cannot blur the comparison."""
    torch.manual_seed(0)
    plain = build_deeplabv3(ARCH, 4, skip_padding_taps=False).double()
    torch.manual_seed(0)
    skipping = build_deeplabv3(ARCH, 4).double()
    assert list(plain.state_dict()) == list(skipping.state_dict())
    batches = [(images.double(), targets) for images, targets in _batches(3)]
    torch.manual_seed(1)  # the same dropout masks (ASPP) in both runs
    _, _, plain_losses = _train(plain, batches)
    torch.manual_seed(1)
    _, _, skipping_losses = _train(skipping, batches)
    assert plain_losses == pytest.approx(skipping_losses, rel=1e-10)
    plain_weights = torch.cat([p.detach().flatten() for p in plain.parameters()])
    skipping_weights = torch.cat([p.detach().flatten() for p in skipping.parameters()])
    drift = float((plain_weights - skipping_weights).norm() / plain_weights.norm())
    assert drift < 1e-10, drift  # scaling the ASPP centre taps by 1.01 before training moves them ~3e-4


def test_backend_settings_leave_the_cpu_alone():
    before = torch.backends.cudnn.benchmark
    assert perf.apply_backend_settings(CPU, cudnn_benchmark=not before) == {}
    assert torch.backends.cudnn.benchmark == before


def test_predictions_argmax_bf16_logits_without_a_float_copy():
    logits = torch.randn(2, 5, 8, 8).to(torch.bfloat16)
    labels = predictions(logits)
    assert labels.dtype == torch.int64 and torch.equal(labels, logits.float().argmax(1))  # bf16 -> fp32 is exact
    binary = predictions(torch.randn(2, 1, 8, 8).to(torch.bfloat16))
    assert binary.shape == (2, 8, 8) and binary.dtype == torch.int64
