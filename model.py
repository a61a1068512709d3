"""The two networks of the paper: the Residual 3D U-Net and the plain 3D U-Net baseline.

ResidualUNet3D follows the paper's Fig. 2/3 block for block (Choi et al. 2021, §3.1-3.4), which is the
"modified 3D U-Net" of Isensee et al. 2017 as ported by pykao/Modified-3D-UNet-Pytorch (`model.py`):

    input ─ encoder block 1 ─────────────────────────────────────────────── decoder block 4 ─ + ─ logits
                 └ encoder block 2 ──────────────────────────── decoder block 3 ─┘ (d3 head)  │
                        └ encoder block 3 ──────────── decoder block 2 ─┘ (d2 head) ──────────┘
                               └ encoder block 4 ── decoder block 1 ─┘
                                      └ bottleneck ─┘

pykao's port differs from Isensee's description in two places, and both are switches here:
`shared_context` (default False: each context module has two convolutions of its own, as Isensee describes;
True: pykao's one convolution applied twice, 7,124,112 parameters at base 16 instead of 9,474,192) and
`dropout` (default 0.3, Isensee's value; pykao's is 0.6). The output is one logit channel; the loss takes
logits, and a sigmoid thresholded at 0.5 gives the mask at inference.

UNet3D is Çiçek et al. 2016 with padded convolutions so that the output has the input's size, and batch
norm by default (Çiçek's); `norm="instance"` or `"group"` swaps the normalisation for the ablation.

Speed: `fast_form` puts a network in the form every training step, validation and prediction runs it in
(channels-last 3-D memory order, optionally `torch.compile`d), and `training_step` is the one training step
(forward, loss, backward, Adam) of the command line and of `bench.py train`. The layers below keep a
channels-last input channels-last, so no step copies activations between memory orders.

Names: "encoder block", "bottleneck" and "decoder block" are the paper's boxes; "context", "localisation"
and "upsampling" modules are Isensee's parts of them; a "head" is a 1x1x1 segmentation layer to logits.
The factories `conv3x3x3` and `conv1x1x1` name kernel sizes, and only they do.

Input sides: both networks take any side. A side that is not a multiple of the network's total
down-sampling (`size_multiple`: 16 for the residual net, 8 for the plain one) is padded at the far end up
to the next multiple with `pad_value` (a forward argument: one number or one per channel, default 0.0, the
background of scans normalised over the brain; pass the scan's own background otherwise) and the logits are
cropped back. Training patches (144 = 9 x 16) are never padded. `min_side` is the smallest side that trains at
batch size 1: the coarsest level must keep more than one voxel for its instance or batch norm statistics.
"""
import inspect
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv3d(nn.Conv3d):
    """nn.Conv3d that runs in float32 where oneDNN's bf16 weight gradient is wrong.

    On CPUs with AVX-512 BF16 but no AMX (AMD Zen 4 seen), torch 2.13's bf16 gradient of a 3x3x3 kernel's
    weights reads uninitialised memory when the input's first spatial side is 2 and it has more than 16
    channels: values up to 1e38, different on every call, and the loss turns NaN. Such a level is the
    coarsest one of a small patch (32 voxels for the residual net), a few voxels in all, so running it in
    float32 costs nothing measurable; every other convolution keeps bf16 autocast.
    """

    def forward(self, x):
        if x.device.type == "cpu" and x.shape[2] == 2 and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                y = super().forward(x.float())
            # float32 kernels give contiguous outputs; keep the channels-last order of fast_form's weights
            last = self.weight.is_contiguous(memory_format=torch.channels_last_3d)
            return y.contiguous(memory_format=torch.channels_last_3d if last else torch.contiguous_format)
        return super().forward(x)


def conv3x3x3(cin, cout, stride=1, bias=False):
    return Conv3d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1x1(cin, cout):
    return nn.Conv3d(cin, cout, 1, bias=False)


class InstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm that keeps its input's memory format. torch's instance norm copies a channels-last
    input to contiguous order; with one volume in the batch (the paper's batch size) it is batch norm over
    that volume with no running statistics, whose kernels read and write either order. Larger batches go
    through torch's own."""

    def forward(self, x):
        if len(x) > 1 or self.track_running_stats:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def instance_norm(c):
    return InstanceNorm3d(c, affine=False)  # pykao: no affine, no running statistics


def act(x):
    return F.leaky_relu(x, 0.01)


def upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def pad_to_multiple(x, multiple, value=0.0):
    """Pad the far end of each spatial axis up to a multiple; return the padded tensor and the old size.

    `value`: one number, or one per channel (a multi-channel scan normalised over the whole crop has a
    background value of its own in each channel).
    """
    size = x.shape[2:]
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size
    fill = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1, 1)
    padded = torch.empty(*x.shape[:2], *(s + e for s, e in zip(size, extra)), dtype=x.dtype, device=x.device,
                         memory_format=memory_format(x))
    padded.copy_(fill.expand_as(padded))
    padded[(..., *(slice(0, s) for s in size))] = x
    return padded, size


def channels_last(x):
    """Whether a 5-D tensor is laid out channels-last (N, D, H, W, C in memory) rather than contiguous. A
    tensor that is both (one channel) counts as contiguous, as torch's convolutions count it."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def memory_format(x):
    return torch.channels_last_3d if channels_last(x) else torch.contiguous_format


class EncoderBlock1(nn.Module):
    """Encoder block 1 (paper §3.1): four convolutions, the first one's output added to the third's.

    `entry` is the first; the context module's two (`context1`, `context2`, dropout between) are the second
    and third; the fourth is the stride-2 convolution that opens encoder block 2. pykao gives this level two
    convolutions of its own even where it shares the others, so there is no `shared_context` here. The skip
    goes out as leaky ReLU of the sum, before instance norm, as in pykao.
    """

    def __init__(self, cin, c, dropout):
        super().__init__()
        self.entry, self.context1, self.context2 = conv3x3x3(cin, c), conv3x3x3(c, c), conv3x3x3(c, c)
        self.drop = nn.Dropout3d(dropout)
        self.norm = instance_norm(c)

    def forward(self, x):
        r = self.entry(x)
        y = self.drop(self.context1(act(r)))
        y = self.context2(act(y)) + r
        return act(self.norm(y)), act(y)  # (to the next block, skip)


class EncoderBlock(nn.Module):
    """Encoder blocks 2-4 (paper §3.2): a stride-2 convolution, then a pre-activation residual context module.

    r = down(x); y = context1(L(IN(r))); dropout; y = context2(L(IN(y))); out = L(IN(y + r)).
    With `shared_context`, context2 is context1 (pykao applies one module twice).
    """

    def __init__(self, cin, c, dropout, shared_context=False):
        super().__init__()
        self.down = conv3x3x3(cin, c, stride=2)
        self.context1 = conv3x3x3(c, c)
        self.context2 = self.context1 if shared_context else conv3x3x3(c, c)
        self.norm1, self.norm2, self.norm_out = instance_norm(c), instance_norm(c), instance_norm(c)
        self.drop = nn.Dropout3d(dropout)

    def forward(self, x):
        r = self.down(x)
        y = self.drop(self.context1(act(self.norm1(r))))
        y = self.context2(act(self.norm2(y)))
        return act(self.norm_out(y + r))


class Bottleneck(nn.Module):
    """Bottleneck (paper §3.3): an encoder block at the coarsest level that ends by upsampling.

    After the encoder block: Isensee's upsampling module (nearest x2, a 3x3x3 convolution halving the
    channels), then a 1x1x1 convolution (pykao's first localisation layer).
    """

    def __init__(self, cin, c, dropout, shared_context=False):
        super().__init__()
        self.encoder = EncoderBlock(cin, c, dropout, shared_context)
        self.upsample_conv, self.upsample_norm = conv3x3x3(c, c // 2), instance_norm(c // 2)
        self.pointwise, self.pointwise_norm = conv1x1x1(c // 2, c // 2), instance_norm(c // 2)

    def forward(self, x):
        y = act(self.upsample_norm(self.upsample_conv(upsample(self.encoder(x)))))
        return act(self.pointwise_norm(self.pointwise(y)))


class DecoderBlock(nn.Module):
    """Decoder blocks 1-3 (paper §3.4): concatenate the skip, Isensee's localisation module (a 3x3x3 then a
    1x1x1 convolution), then his upsampling module (nearest x2 and a 3x3x3 convolution).

    With c the skip's channels: concat -> 2c -> localisation 2c -> pointwise c -> up -> upsample_conv c/2.
    Also returns the localisation features, which feed the deep-supervision heads.
    """

    def __init__(self, c):
        super().__init__()
        self.localisation, self.localisation_norm = conv3x3x3(2 * c, 2 * c), instance_norm(2 * c)
        self.pointwise, self.pointwise_norm = conv1x1x1(2 * c, c), instance_norm(c)
        self.upsample_conv, self.upsample_norm = conv3x3x3(c, c // 2), instance_norm(c // 2)

    def forward(self, x, skip):
        features = act(self.localisation_norm(self.localisation(torch.cat([x, skip], 1))))
        y = act(self.pointwise_norm(self.pointwise(features)))
        return act(self.upsample_norm(self.upsample_conv(upsample(y)))), features


class DecoderBlock4(nn.Module):
    """Decoder block 4 (paper §3.4, the last box of Fig. 2): concatenate encoder block 1's skip, a 3x3x3
    localisation convolution, then the 1x1x1 head to the output logits (before the deep-supervision sum)."""

    def __init__(self, c, out_channels):
        super().__init__()
        self.localisation, self.localisation_norm = conv3x3x3(2 * c, 2 * c), instance_norm(2 * c)
        self.head = conv1x1x1(2 * c, out_channels)

    def forward(self, x, skip):
        return self.head(act(self.localisation_norm(self.localisation(torch.cat([x, skip], 1)))))


class ResidualUNet3D(nn.Module):
    """Residual 3D U-Net (paper Fig. 2, 3): 4 encoder blocks, a bottleneck, 4 decoder blocks.

    Args:
        in_channels: input MR channels (the paper: 1).
        out_channels: output logit channels (the paper: 1, lesion vs background).
        base_filters: channels of encoder block 1; they double per level (16 -> 16/32/64/128/256).
        dropout: Dropout3d probability inside each context module (5 places). 0.3 is Isensee's; pykao's 0.6.
        shared_context: pykao's port, one convolution applied twice in the context modules of encoder blocks
            2-4 and the bottleneck. False (ours) gives each its own weights, as Isensee describes.

    Deep supervision as in Isensee 2017: 1x1x1 heads on decoder blocks 2 and 3 are upsampled and added
    to decoder block 4's logits, so one loss on the summed logits trains all three (no auxiliary losses).
    With the defaults the network has 9,474,192 parameters, all convolution weights.

    >>> net = ResidualUNet3D()
    >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
    torch.Size([1, 1, 32, 32, 32])
    """

    size_multiple = 16  # four stride-2 convolutions
    min_side = 32  # leaves the bottleneck 2 voxels a side: instance norm needs more than one

    def __init__(self, in_channels=1, out_channels=1, base_filters=16, dropout=0.3, shared_context=False):
        super().__init__()
        f = base_filters
        self.encoder1 = EncoderBlock1(in_channels, f, dropout)
        self.encoder2 = EncoderBlock(f, 2 * f, dropout, shared_context)
        self.encoder3 = EncoderBlock(2 * f, 4 * f, dropout, shared_context)
        self.encoder4 = EncoderBlock(4 * f, 8 * f, dropout, shared_context)
        self.bottleneck = Bottleneck(8 * f, 16 * f, dropout, shared_context)
        self.decoder1 = DecoderBlock(8 * f)
        self.decoder2 = DecoderBlock(4 * f)
        self.decoder3 = DecoderBlock(2 * f)
        self.decoder4 = DecoderBlock4(f, out_channels)
        self.head2 = conv1x1x1(8 * f, out_channels)  # on decoder block 2's localisation features
        self.head3 = conv1x1x1(4 * f, out_channels)  # on decoder block 3's localisation features

    def forward(self, x, pad_value=0.0):
        """Logits of the input's size; `pad_value` fills the padding up to `size_multiple` (the background)."""
        x, size = pad_to_multiple(x, self.size_multiple, pad_value)
        y, skip1 = self.encoder1(x)
        skip2 = self.encoder2(y)
        skip3 = self.encoder3(skip2)
        skip4 = self.encoder4(skip3)
        y = self.bottleneck(skip4)
        y, _ = self.decoder1(y, skip4)
        y, d2 = self.decoder2(y, skip3)
        y, d3 = self.decoder3(y, skip2)
        logits = self.decoder4(y, skip1) + upsample(upsample(self.head2(d2)) + self.head3(d3))
        return logits[(...,) + tuple(slice(0, s) for s in size)]


def max_pool2(x):
    """2x2x2 max pooling. Written as a reshape because F.max_pool3d's CUDA backward uses atomic adds, which
    would make seeded GPU runs differ; the forward is identical. Sides are even (padded to a multiple of 8).
    The reduction runs in the input's memory order (channels last: N, D, H, W, C), so that its result keeps
    that layout; either order gives the same values."""
    n, c, d, h, w = x.shape
    if channels_last(x):
        y = x.permute(0, 2, 3, 4, 1).reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4, 6))
        return y.permute(0, 4, 1, 2, 3)
    return x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2).amax(dim=(3, 5, 7))


GROUPS = 8
"""Group norm's group count: the default of wolny/pytorch-3dunet's 3D U-Net (Wu & He 2018 use 32 in 2D,
which on the baseline's 32-channel first layer would be instance norm). Every width at base 32 is a multiple
of 8; a narrower test net whose width is not falls back to gcd(8, channels) groups."""


NORMS = {
    "batch": nn.BatchNorm3d,
    "instance": lambda c: nn.InstanceNorm3d(c, affine=True),
    "group": lambda c: nn.GroupNorm(math.gcd(GROUPS, c), c),
}
"""The baseline's normalisation after each convolution, by name. All three have 2c affine parameters, so the
parameter count does not depend on the choice; only batch norm keeps running statistics for evaluation."""


def double_conv(cin, cmid, cout, norm):
    """Çiçek's level: two 3x3x3 convolutions, each followed by normalisation (batch norm in Çiçek) and ReLU."""
    return nn.Sequential(
        conv3x3x3(cin, cmid, bias=True), NORMS[norm](cmid), nn.ReLU(inplace=True),
        conv3x3x3(cmid, cout, bias=True), NORMS[norm](cout), nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """3D U-Net baseline (Çiçek et al. 2016), padded so that the output has the input's size.

    Args:
        in_channels: input MR channels (the paper: 1).
        out_channels: output logit channels (the paper: 1).
        base_filters: channels of the first convolution (Çiçek: 32); levels are 32,64 / 64,128 /
            128,256 / bottom 256,512, doubling before each max pool as in Çiçek.
        norm: "batch" (Çiçek's, the default), "instance" or "group" (`GROUPS` groups).

    Analysis path: double conv, 2x2x2 max pool, three times, then the bottom double conv. Synthesis path:
    2x2x2 stride-2 up-convolution keeping the channels, concatenation with the skip, double conv. A 1x1x1
    convolution with bias gives the logits. With batch size 1, batch norm in training normalises over one
    volume while evaluation uses the running statistics, a mismatch instance and group norm do not have.
    With the defaults: 19,073,665 parameters, whichever the norm.
    """

    size_multiple = 8  # three 2x2x2 max pools
    min_side = 16  # leaves the bottom level 2 voxels a side: batch norm at batch size 1 needs more than one
    norms = tuple(NORMS)

    def __init__(self, in_channels=1, out_channels=1, base_filters=32, norm="batch"):
        super().__init__()
        if norm not in self.norms:
            raise ValueError(f"unknown norm {norm!r}: expected one of {self.norms}")
        f = base_filters
        self.analysis1 = double_conv(in_channels, f, 2 * f, norm)
        self.analysis2 = double_conv(2 * f, 2 * f, 4 * f, norm)
        self.analysis3 = double_conv(4 * f, 4 * f, 8 * f, norm)
        self.bottom = double_conv(8 * f, 8 * f, 16 * f, norm)
        self.upconv3 = nn.ConvTranspose3d(16 * f, 16 * f, 2, 2)
        self.synthesis3 = double_conv(24 * f, 8 * f, 8 * f, norm)
        self.upconv2 = nn.ConvTranspose3d(8 * f, 8 * f, 2, 2)
        self.synthesis2 = double_conv(12 * f, 4 * f, 4 * f, norm)
        self.upconv1 = nn.ConvTranspose3d(4 * f, 4 * f, 2, 2)
        self.synthesis1 = double_conv(6 * f, 2 * f, 2 * f, norm)
        self.head = nn.Conv3d(2 * f, out_channels, 1)

    def forward(self, x, pad_value=0.0):
        """Logits of the input's size; `pad_value` fills the padding up to `size_multiple` (the background)."""
        x, size = pad_to_multiple(x, self.size_multiple, pad_value)
        skip1 = self.analysis1(x)
        skip2 = self.analysis2(max_pool2(skip1))
        skip3 = self.analysis3(max_pool2(skip2))
        y = self.bottom(max_pool2(skip3))
        y = self.synthesis3(torch.cat([self.upconv3(y), skip3], 1))
        y = self.synthesis2(torch.cat([self.upconv2(y), skip2], 1))
        y = self.synthesis1(torch.cat([self.upconv1(y), skip1], 1))
        return self.head(y)[(...,) + tuple(slice(0, s) for s in size)]


MODELS = {"residual": ResidualUNet3D, "unet": UNet3D}
"""Model name -> class: `MODELS[name].size_multiple` and `.min_side` without building the network."""


def options(name):
    """The keyword options a model takes beyond in_channels and base_filters, with their defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("in_channels", "base_filters")}


def build_model(name, in_channels=1, base_filters=None, **model_options):
    """The one entry point of the command line: `residual` (Residual 3D U-Net) or `unet` (3D U-Net).

    base_filters None is the paper's width for that model (16 residual, 32 unet: the class's default).
    `model_options` are the model's own (`options(name)`: dropout, shared_context, out_channels for
    residual; norm, out_channels for unet). An unknown name or an option the model does not take is a
    ValueError naming it.
    """
    allowed = options(name)
    for key in model_options:
        if key not in allowed:
            raise ValueError(f"the {name} model takes no option {key!r}; its options are {sorted(allowed)}")
    if base_filters is not None:
        model_options["base_filters"] = base_filters
    return MODELS[name](in_channels=in_channels, **model_options)


# --------------------------------------------------------------------------------------------
# The form the networks run in

def compile_errors():
    """What a failed torch.compile raises, at the first forward or, for the backward it compiles lazily, at
    the first backward: inductor's errors (no working C++ compiler, an unsupported op) come wrapped in
    these. Looked up on use: torch._dynamo takes seconds to import."""
    import torch._dynamo.exc
    return (torch._dynamo.exc.TorchDynamoException,)


def fast_form(net, compile=False):
    """Put ``net`` in the form in which training, validation and prediction run it; returns what to call.

    The weights go to channels-last 3-D memory order (N, D, H, W, C), in place as ``Module.to`` converts
    them: the parameters stay the same objects, so an optimizer made before or after, ``state_dict`` and
    ``load_state_dict`` work on ``net`` as before. Inputs need no conversion: a convolution with
    channels-last weights gives a channels-last output whatever its input's order, and every layer here
    keeps that order. With ``compile``, the returned module runs ``net`` through ``torch.compile``
    (inductor), falling back to eager with one warning if compilation fails (``Compiled``); keep ``net``
    itself for its parameters and checkpoints.
    """
    net.to(memory_format=torch.channels_last_3d)
    return Compiled(net) if compile else net


class Compiled(nn.Module):
    """``net`` through ``torch.compile``, or eagerly once compilation has failed (one warning). Its only
    submodule is ``net``: ``train()``/``eval()`` reach it, and it holds no parameters of its own."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.__dict__["compiled"] = torch.compile(net)  # not a submodule: its parameters are net's

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except compile_errors() as error:
                self.fall_back(error)
        return self.net(*args, **kwargs)

    def fall_back(self, error):
        """Run eagerly from now on, saying why once."""
        reason = (str(error).strip().splitlines() or [""])[0]
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {reason}); the network runs eagerly",
                      RuntimeWarning, stacklevel=3)
        self.__dict__["compiled"] = None


def training_step(net, optimizer, loss_fn, image, label, autocast):
    """One training step on one batch: forward and loss under the ``autocast`` context, backward, one
    optimizer step; returns the loss, detached (no host sync). When ``net`` is ``Compiled`` and
    compilation fails, in the forward or in the backward (compiled lazily at the first backward), the
    step runs again eagerly: nothing of the failed try reaches the weights."""
    if not (isinstance(net, Compiled) and net.compiled is not None):
        return _step(net, optimizer, loss_fn, image, label, autocast)
    try:
        return _step(net, optimizer, loss_fn, image, label, autocast)
    except compile_errors() as error:
        net.fall_back(error)
        return _step(net, optimizer, loss_fn, image, label, autocast)


def _step(net, optimizer, loss_fn, image, label, autocast):
    with autocast:
        loss = loss_fn(net(image), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
