"""The convolutional encoder's inference path: batch norm folded into the convolutions, channels-last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cellsam.config import ConvEncoderConfig, EncoderConfig
from cellsam.models.conv_encoder import ConvBN, ConvEncoder, set_fast_inference


def _randomise_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Batch norms with statistics and affine parameters far from their defaults."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))  # type: ignore[union-attr]
            m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)  # type: ignore[union-attr]
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen))


@pytest.mark.parametrize("relu", [True, False])
def test_conv_bn_folds_the_norm_out_of_training_only(relu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    block = ConvBN(4, 6, stride=2, relu=relu)
    _randomise_norms(block, gen)
    assert list(block.state_dict()) == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                        "1.num_batches_tracked"]  # nn.Sequential's keys: old checkpoints load
    x = torch.randn(3, 4, 17, 17, generator=gen)
    block.eval()
    want = nn.Sequential.forward(block, x)  # convolution, then the norm with its running statistics
    calls: list[int] = []
    real_bn = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real_bn(*a, **k))
    got = block(x)
    assert calls == []  # folded: no separate norm pass
    assert got.shape == (3, 6, 9, 9) and torch.allclose(got, want, atol=1e-5)
    assert (got.min() >= 0) == relu
    block.train()  # training normalises by the batch's statistics, as nn.Sequential does
    got = block(x)
    assert calls and not torch.allclose(got, want, atol=1e-3)
    assert torch.allclose(got, nn.Sequential.forward(block, x), atol=1e-5)


def test_encoder_inference_path_gives_the_plain_path_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    enc = ConvEncoder(EncoderConfig(img_size=64, patch_size=8, out_chans=16),
                      ConvEncoderConfig(widths=(8, 16, 16, 24), blocks=(1, 1, 1, 1), decoder_widths=(8, 16)))
    _randomise_norms(enc, gen)
    enc.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        out = enc(x)
    assert out.trunk.is_contiguous() and out.embedding.is_contiguous()  # callers may .view() them
    monkeypatch.setattr(ConvBN, "forward", nn.Sequential.forward)  # the norms unfused
    with torch.inference_mode():
        ref = enc(x.contiguous())
    assert out.trunk.shape == (2, 8, 16, 16) and out.embedding.shape == (2, 16, 8, 8)
    assert torch.allclose(out.trunk, ref.trunk, atol=1e-4) and torch.allclose(out.embedding, ref.embedding, atol=1e-4)
    assert not torch.allclose(out.trunk, torch.zeros_like(out.trunk))


def test_training_keeps_the_plain_arithmetic(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_fast_inference(False): eval mode gives the unfused, contiguous path exactly; training sets it so
    that a frozen trunk (masks stage) and the size fit compute what they computed before the fast path."""
    gen = torch.Generator().manual_seed(2)
    enc = ConvEncoder(EncoderConfig(img_size=32, patch_size=8, out_chans=16),
                      ConvEncoderConfig(widths=(8, 16, 16), blocks=(1, 1, 1), decoder_widths=(8,)))
    _randomise_norms(enc, gen)
    enc.eval()
    x = torch.randn(1, 3, 32, 32, generator=gen)
    assert set_fast_inference(enc, False) is enc
    assert not any(getattr(m, "fast_inference", False) for m in enc.modules())
    calls: list[int] = []
    real_bn = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real_bn(*a, **k))
    with torch.inference_mode():
        plain = enc(x)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    assert len(calls) == n_norms  # every norm ran as its own pass
    monkeypatch.setattr(ConvBN, "forward", nn.Sequential.forward)
    with torch.inference_mode():
        ref = enc(x)
    assert torch.equal(plain.trunk, ref.trunk) and torch.equal(plain.embedding, ref.embedding)  # bit for bit
    monkeypatch.undo()

    from cellsam.train import run

    seen: list[bool] = []

    class Stop(Exception):
        pass

    def module(model, cfg):  # type: ignore[no-untyped-def]
        seen.extend(m.fast_inference for m in model.modules() if isinstance(m, (ConvBN, ConvEncoder)))
        raise Stop

    monkeypatch.setattr(run, "CellSAMModule", module)
    from cellsam.train.config import TrainConfig

    with pytest.raises(Stop):
        run.train(TrainConfig(model="conv_tiny", output=str(tmp_path / "out"), max_steps=1))
    assert seen and not any(seen)  # the stage trains (and validates) on the plain path
