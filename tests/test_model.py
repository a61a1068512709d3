import math

import pytest
import torch
import torch.nn as nn

from metrics import BCEDiceLoss
from model import (MODELS, EncoderBlock, EncoderBlock1, ResidualUNet3D, UNet3D, build_model, fast_form, options,
                   training_step)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def tiny(name):
    torch.manual_seed(0)
    return build_model(name, base_filters=4)


def volume(name, batch=1):
    side = MODELS[name].min_side
    return torch.randn(batch, 1, side, side, side)


def test_parameter_counts_match_the_spec():
    assert n_params(ResidualUNet3D()) == 9_474_192
    assert n_params(UNet3D()) == 19_073_665


def test_pykao_shared_context_count_and_sharing():
    # pykao applies each context convolution of encoder blocks 2-4 and the bottleneck twice; block 1 keeps two.
    net = build_model("residual", shared_context=True)
    assert n_params(net) == 7_124_112
    for block in (net.encoder2, net.encoder3, net.encoder4, net.bottleneck.encoder):
        assert block.context2 is block.context1
    assert net.encoder1.context2 is not net.encoder1.context1
    distinct = build_model("residual", base_filters=4)
    assert distinct.encoder2.context2 is not distinct.encoder2.context1


@pytest.mark.parametrize("norm", UNet3D.norms)
def test_unet_norm_choice_keeps_the_parameter_count(norm):
    net = build_model("unet", norm=norm)
    assert n_params(net) == 19_073_665
    kinds = {type(m) for m in net.modules()} & {nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm}
    assert kinds == {{"batch": nn.BatchNorm3d, "instance": nn.InstanceNorm3d, "group": nn.GroupNorm}[norm]}
    if norm == "group":
        assert {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} == {8}


def test_group_norm_of_a_narrow_net_divides_its_channels():
    net = build_model("unet", base_filters=4, norm="group")  # the first layer has 4 channels, not a multiple of 8
    assert {(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, nn.GroupNorm)} >= {(4, 4), (8, 8)}
    net.train()(volume("unet"))


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="residual"):
        build_model("resunet")
    with pytest.raises(ValueError, match="unet"):
        options("resunet")


@pytest.mark.parametrize("name, option", [("residual", "norm"), ("unet", "shared_context"), ("unet", "dropout")])
def test_build_model_rejects_an_option_the_model_does_not_take(name, option):
    with pytest.raises(ValueError, match=option):
        build_model(name, **{option: True})


def test_build_model_defaults_to_the_papers_widths_and_passes_options_on():
    assert build_model("residual").encoder1.entry.out_channels == 16
    assert build_model("unet").analysis1[0].out_channels == 32
    assert build_model("residual", base_filters=8).encoder1.entry.out_channels == 8
    net = build_model("residual", base_filters=4, dropout=0.6)
    assert {m.p for m in net.modules() if isinstance(m, nn.Dropout3d)} == {0.6}
    assert {m.p for m in build_model("residual").modules() if isinstance(m, nn.Dropout3d)} == {0.3}
    assert options("residual") == {"out_channels": 1, "dropout": 0.3, "shared_context": False}
    assert options("unet") == {"out_channels": 1, "norm": "batch"}


def test_size_multiple_and_min_side_are_known_without_building():
    assert MODELS["residual"].size_multiple == 16 and MODELS["unet"].size_multiple == 8
    assert MODELS["residual"].min_side == 32 and MODELS["unet"].min_side == 16


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_min_side_is_the_smallest_multiple_that_trains_at_batch_one(name):
    net = tiny(name).train()
    side = MODELS[name].min_side
    assert side % MODELS[name].size_multiple == 0
    net(torch.randn(1, 1, side, side, side))
    smaller = side - MODELS[name].size_multiple
    with pytest.raises(ValueError, match="more than 1"):  # one voxel at the coarsest level: no statistics
        net(torch.randn(1, 1, smaller, smaller, smaller))


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_multi_channel_input(name):
    torch.manual_seed(0)
    net = build_model(name, in_channels=3, base_filters=4).eval()
    side = MODELS[name].min_side
    x = torch.randn(1, 3, side, side, side)
    out = net(x)
    assert out.shape == (1, 1, *x.shape[2:])
    for c in range(3):  # every channel reaches the output
        changed = x.clone()
        changed[:, c] += 1
        assert not torch.allclose(net(changed), out)


@pytest.mark.parametrize("name", ["residual", "unet"])
@pytest.mark.parametrize("size", [(32, 32, 32), (17, 40, 23)])
def test_output_is_one_logit_channel_of_the_input_size(name, size):
    net = tiny(name).eval()
    out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 1, *size)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_padding_does_not_change_what_a_multiple_sees(name):
    # A side that is not a multiple is zero-padded at the far end: the same as padding by hand.
    net = tiny(name).eval()
    x = torch.randn(1, 1, 30, 32, 25)
    padded = torch.nn.functional.pad(x, (0, 7, 0, 0, 0, 2))
    torch.testing.assert_close(net(x), net(padded)[..., :30, :32, :25])


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_pad_value_fills_the_padding_and_only_the_padding(name):
    net = tiny(name).eval()
    background = -0.8  # e.g. a scan z-scored over the whole crop: its background is not 0
    x = torch.randn(1, 1, 30, 32, 25)
    padded = torch.nn.functional.pad(x, (0, 7, 0, 0, 0, 2), value=background)
    torch.testing.assert_close(net(x, pad_value=background), net(padded)[..., :30, :32, :25])
    assert not torch.allclose(net(x, pad_value=background), net(x))
    whole = torch.randn(1, 1, 32, 32, 32)  # a multiple of either network's size multiple: nothing is padded
    torch.testing.assert_close(net(whole, pad_value=background), net(whole))


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_pad_value_per_channel(name):
    torch.manual_seed(0)
    net = build_model(name, in_channels=2, base_filters=4).eval()
    x = torch.randn(1, 2, 30, 32, 25)
    by_hand = torch.cat([torch.nn.functional.pad(x[:, c:c + 1], (0, 7, 0, 0, 0, 2), value=v)
                         for c, v in enumerate((-0.8, 0.5))], 1)
    torch.testing.assert_close(net(x, pad_value=(-0.8, 0.5)), net(by_hand)[..., :30, :32, :25])


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_every_parameter_gets_a_gradient(name):
    net = tiny(name).train()
    x = volume(name, batch=2)
    loss = BCEDiceLoss()(net(x), (torch.rand_like(x) > 0.8).float())
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_encoder_block1_adds_the_first_convolution_to_the_third():
    torch.manual_seed(0)
    block = EncoderBlock1(1, 4, dropout=0.0).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    _, skip = block(x)
    with torch.no_grad():
        r = block.entry(x)
        without = block.context2(nn.functional.leaky_relu(block.context1(nn.functional.leaky_relu(r, 0.01)), 0.01))
    torch.testing.assert_close(skip, nn.functional.leaky_relu(without + r, 0.01))
    assert not torch.allclose(skip, nn.functional.leaky_relu(without, 0.01))


def test_encoder_block_residual_add_carries_the_strided_convolution():
    # Zero the residual branch's last conv: the block must still pass the strided conv's output through.
    torch.manual_seed(0)
    block = EncoderBlock(2, 4, dropout=0.0).eval()
    nn.init.zeros_(block.context2.weight)
    x = torch.randn(1, 2, 8, 8, 8)
    expected = nn.functional.leaky_relu(block.norm_out(block.down(x)), 0.01)
    torch.testing.assert_close(block(x), expected)
    assert block(x).abs().sum() > 0


def test_deep_supervision_heads_reach_the_output():
    net = tiny("residual").eval()
    x = volume("residual")
    before = net(x)
    nn.init.zeros_(net.head2.weight)
    nn.init.zeros_(net.head3.weight)
    assert not torch.allclose(before, net(x))


@pytest.mark.parametrize("name, norm", [("residual", None), ("unet", "batch"), ("unet", "instance"),
                                        ("unet", "group")])
def test_only_dropout_and_batchnorm_differ_between_train_and_eval(name, norm):
    torch.manual_seed(0)
    net = build_model(name, base_filters=4, **({"norm": norm} if norm else {}))
    x = volume(name)
    for m in net.modules():  # switch off the two legitimate sources of difference
        if isinstance(m, nn.Dropout3d):
            m.p = 0.0
        if isinstance(m, nn.BatchNorm3d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    torch.testing.assert_close(net.train()(x), net.eval()(x))


def test_dropout_makes_training_stochastic_and_eval_deterministic():
    net = tiny("residual")
    x = volume("residual")
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_bf16_autocast_and_channels_last_3d(name):
    net = tiny(name).eval()
    x = volume(name)
    reference = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    diff = (torch.sigmoid(out.float()) - torch.sigmoid(reference)).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.2  # bf16 keeps 8 bits of mantissa through ~20 layers
    net_cl = net.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last_3d)), reference, atol=1e-4, rtol=1e-4)


def test_torch_compile_gives_the_eager_result():
    net = tiny("residual").eval()
    x = volume("residual")
    compiled = torch.compile(net)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-4, rtol=1e-4)


def test_bce_dice_overfits_one_volume():
    # The loss must be able to drive a tiny network to a near-perfect fit of one 32-voxel volume.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.zeros(1, 1, 32, 32, 32)
    y[..., 8:14, 10:18, 12:20] = 1
    y[..., 20:24, 20:23, 5:9] = 1
    x = x + 2 * y  # a faint lesion signal the network can find
    net = build_model("residual", base_filters=4, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = BCEDiceLoss()
    first = loss_fn(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    pred = (net(x) > 0).float()
    dsc = 2 * (pred * y).sum() / (pred.sum() + y.sum())
    assert loss.item() < 0.3 * first
    assert dsc > 0.9


def test_a_depth_two_level_has_a_finite_repeatable_weight_gradient_under_bf16():
    """The coarsest level of a small patch (first side 2, over 16 channels): its bf16 weight gradient is
    wrong on some CPUs (model.Conv3d); it must match float32 to bf16's precision on every call."""
    from model import conv3x3x3
    torch.manual_seed(0)
    conv, x = conv3x3x3(32, 32), torch.randn(1, 32, 2, 4, 4)
    conv(x).square().sum().backward()
    reference, conv.weight.grad = conv.weight.grad.clone(), None
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
        assert torch.allclose(conv.weight.grad, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
        conv.weight.grad = None


def conv_outputs_channels_last(net, x):
    """Whether every convolution of ``net`` gives a channels-last output on ``x`` (forward hooks)."""
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, out: layouts.append(out.is_contiguous(
        memory_format=torch.channels_last_3d))) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    net(x)
    for hook in hooks:
        hook.remove()
    return all(layouts) and len(layouts) > 0


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_fast_form_keeps_channels_last_and_the_plain_result(name):
    torch.manual_seed(0)
    plain = build_model(name, in_channels=2, base_filters=4).eval()
    fast = build_model(name, in_channels=2, base_filters=4).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast_form(fast) is fast
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in fast.parameters() if p.dim() == 5)
    x = torch.randn(1, 2, 30, 32, 25)  # padded up to the size multiple: the padding keeps the layout too
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (torch's small fp32 3-D convolutions are contiguous)
        assert conv_outputs_channels_last(fast, x)
    torch.testing.assert_close(fast(x, pad_value=(-0.8, 0.5)), plain(x, pad_value=(-0.8, 0.5)), atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, reference = fast(x), plain(x)
    diff = (torch.sigmoid(out.float()) - torch.sigmoid(reference.float())).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1


def train_losses(name, fast, steps=3):
    """Losses of a few bf16 training steps from seed 0, in the fast form or the plain one. 48 voxels a side:
    at the smallest side (32) the residual bottleneck is 2 voxels deep, where oneDNN's bf16 weight gradient
    of a 3x3x3 convolution on AVX-512 BF16 CPUs without AMX reads undefined memory (in either form)."""
    torch.manual_seed(0)
    net = build_model(name, base_filters=4).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    run = fast_form(net) if fast else net
    x = torch.randn(1, 1, 48, 48, 48)
    y = (torch.rand_like(x) > 0.9).float()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    return [training_step(run, optimizer, BCEDiceLoss(), x, y, autocast).item() for _ in range(steps)]


@pytest.mark.parametrize("name", ["residual", "unet"])
def test_training_step_in_the_fast_form_is_deterministic_and_follows_the_plain_one(name):
    first = train_losses(name, fast=True)
    assert train_losses(name, fast=True) == first  # same seed, same threads: the same losses
    plain = train_losses(name, fast=False)
    assert all(math.isfinite(loss) for loss in first)
    assert max(abs(a - b) for a, b in zip(first, plain)) < 0.02


class Failing(torch.autograd.Function):
    """Identity forward; a backward that fails as a lazily compiled backward does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        from torch._dynamo.exc import TorchDynamoException
        raise TorchDynamoException("no working C++ compiler")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failed_compilation_falls_back_to_eager_with_one_warning(where, monkeypatch):
    def broken_compile(net):
        def call(*args, **kwargs):
            if where == "forward":
                from torch._dynamo.exc import TorchDynamoException
                raise TorchDynamoException("no working C++ compiler")
            return Failing.apply(net(*args, **kwargs))
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = train_losses("residual", fast=True, steps=2)
    torch.manual_seed(0)
    net = build_model("residual", base_filters=4).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    run = fast_form(net, compile=True)
    x = torch.randn(1, 1, 48, 48, 48)
    y = (torch.rand_like(x) > 0.9).float()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="torch.compile failed") as warned:
        losses = [training_step(run, optimizer, BCEDiceLoss(), x, y, autocast).item() for _ in range(2)]
    assert len(warned) == 1 and run.compiled is None
    if where == "forward":  # nothing ran compiled: the eager run's losses exactly
        assert losses == eager
    assert list(run.state_dict()) == [f"net.{k}" for k in net.state_dict()]  # no parameters of its own
