"""The two networks of the paper: the Residual 3D U-Net and the plain 3D U-Net baseline.

ResidualUNet3D follows the paper's Fig. 2/3 block for block (Choi et al. 2021, §3.1-3.4), which is the
"modified 3D U-Net" of Isensee et al. 2017 as ported by pykao/Modified-3D-UNet-Pytorch:

    input ─ encoder block 1 ─────────────────────────────────────────────── decoder block 4 ─ + ─ logits
                 └ encoder block 2 ──────────────────────────── decoder block 3 ─┘ (d3 head)  │
                        └ encoder block 3 ──────────── decoder block 2 ─┘ (d2 head) ──────────┘
                               └ encoder block 4 ── decoder block 1 ─┘
                                      └ bottleneck ─┘

Two deliberate deviations from pykao (spec/architectures.md §0): the two convolutions of each context
module have their own weights (pykao applies one module twice, a porting bug), and dropout is 0.3
(Isensee's value) instead of 0.6. The output is one logit channel; the loss takes logits, and a sigmoid
thresholded at 0.5 gives the mask at inference.

UNet3D is Cicek et al. 2016 with padded convolutions so that the output has the input's size.

Input sides: both networks take any side. A side that is not a multiple of the network's total
down-sampling (16 for the residual net, 8 for the plain one) is zero-padded at the far end up to the
next multiple and the logits are cropped back; zero is the background value of our normalised scans.
Training patches (144 = 9 x 16) are never padded.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3(cin, cout, stride=1):
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1(cin, cout):
    return nn.Conv3d(cin, cout, 1, bias=False)


def norm(c):
    return nn.InstanceNorm3d(c, affine=False)  # pykao: no affine, no running statistics


def act(x):
    return F.leaky_relu(x, 0.01)


def up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def pad_to_multiple(x, multiple):
    """Zero-pad the far end of each spatial axis up to a multiple; return the padded tensor and the old size."""
    size = x.shape[2:]
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size
    return F.pad(x, [p for e in reversed(extra) for p in (0, e)]), size


class EncoderBlock1(nn.Module):
    """Encoder block 1 (paper §3.1): four convolutions, the first one's output added to the third's.

    The fourth convolution is the stride-2 convolution that opens encoder block 2. The skip goes out
    as leaky ReLU of the sum, before instance norm, as in pykao.
    """

    def __init__(self, cin, c, dropout):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv3(cin, c), conv3(c, c), conv3(c, c)
        self.drop = nn.Dropout3d(dropout)
        self.norm = norm(c)

    def forward(self, x):
        r = self.conv1(x)
        y = self.drop(self.conv2(act(r)))
        y = self.conv3(act(y)) + r
        return act(self.norm(y)), act(y)  # (to the next block, skip)


class EncoderBlock(nn.Module):
    """Encoder blocks 2-4 (paper §3.2): a stride-2 convolution, then a pre-activation residual module.

    r = conv_s2(x); y = conv(L(IN(r))); dropout; y = conv(L(IN(y))); out = L(IN(y + r)).
    """

    def __init__(self, cin, c, dropout):
        super().__init__()
        self.down = conv3(cin, c, stride=2)
        self.conv1, self.conv2 = conv3(c, c), conv3(c, c)
        self.norm1, self.norm2, self.norm_out = norm(c), norm(c), norm(c)
        self.drop = nn.Dropout3d(dropout)

    def forward(self, x):
        r = self.down(x)
        y = self.drop(self.conv1(act(self.norm1(r))))
        y = self.conv2(act(self.norm2(y)))
        return act(self.norm_out(y + r))


class Bottleneck(nn.Module):
    """Bottleneck (paper §3.3): an encoder block at the coarsest level that ends by upsampling.

    After the residual module: nearest x2, 3x3x3 convolution halving the channels, then a 1x1x1 convolution.
    """

    def __init__(self, cin, c, dropout):
        super().__init__()
        self.context = EncoderBlock(cin, c, dropout)
        self.up_conv, self.up_norm = conv3(c, c // 2), norm(c // 2)
        self.conv, self.norm = conv1(c // 2, c // 2), norm(c // 2)

    def forward(self, x):
        y = act(self.up_norm(self.up_conv(up(self.context(x)))))
        return act(self.norm(self.conv(y)))


class DecoderBlock(nn.Module):
    """Decoder blocks 1-3 (paper §3.4): concatenate the skip, a 3x3x3 then a 1x1x1 convolution
    (Isensee's localisation module), then nearest x2 and a 3x3x3 convolution (the upsampling module).

    With c the skip's channels: concat -> 2c -> conv3 2c -> conv1 c -> up -> conv3 c/2. Also returns the
    3x3x3 features, which feed the deep-supervision heads.
    """

    def __init__(self, c):
        super().__init__()
        self.conv3, self.norm3 = conv3(2 * c, 2 * c), norm(2 * c)
        self.conv1, self.norm1 = conv1(2 * c, c), norm(c)
        self.up_conv, self.up_norm = conv3(c, c // 2), norm(c // 2)

    def forward(self, x, skip):
        features = act(self.norm3(self.conv3(torch.cat([x, skip], 1))))
        y = act(self.norm1(self.conv1(features)))
        return act(self.up_norm(self.up_conv(up(y)))), features


class ResidualUNet3D(nn.Module):
    """Residual 3D U-Net (paper Fig. 2, 3): 4 encoder blocks, a bottleneck, 4 decoder blocks.

    Args:
        in_channels: input MR channels (the paper: 1).
        out_channels: output logit channels (the paper: 1, lesion vs background).
        base_filters: channels of encoder block 1; they double per level (16 -> 16/32/64/128/256).
        dropout: Dropout3d probability inside each residual module (5 places).

    Deep supervision as in Isensee 2017: 1x1x1 heads on decoder blocks 2 and 3 are upsampled and added
    to the final logits, so one loss on the summed logits trains all three (no auxiliary losses).
    With the defaults the network has 9,474,192 parameters, all convolution weights.

    >>> net = ResidualUNet3D()
    >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
    torch.Size([1, 1, 32, 32, 32])
    """

    multiple = 16

    def __init__(self, in_channels=1, out_channels=1, base_filters=16, dropout=0.3):
        super().__init__()
        f = base_filters
        self.encoder1 = EncoderBlock1(in_channels, f, dropout)
        self.encoder2 = EncoderBlock(f, 2 * f, dropout)
        self.encoder3 = EncoderBlock(2 * f, 4 * f, dropout)
        self.encoder4 = EncoderBlock(4 * f, 8 * f, dropout)
        self.bottleneck = Bottleneck(8 * f, 16 * f, dropout)
        self.decoder1 = DecoderBlock(8 * f)
        self.decoder2 = DecoderBlock(4 * f)
        self.decoder3 = DecoderBlock(2 * f)
        self.decoder4_conv, self.decoder4_norm = conv3(2 * f, 2 * f), norm(2 * f)
        self.head4 = conv1(2 * f, out_channels)
        self.head2 = conv1(8 * f, out_channels)  # on decoder block 2's features
        self.head3 = conv1(4 * f, out_channels)  # on decoder block 3's features

    def forward(self, x):
        x, size = pad_to_multiple(x, self.multiple)
        y, skip1 = self.encoder1(x)
        skip2 = self.encoder2(y)
        skip3 = self.encoder3(skip2)
        skip4 = self.encoder4(skip3)
        y = self.bottleneck(skip4)
        y, _ = self.decoder1(y, skip4)
        y, d2 = self.decoder2(y, skip3)
        y, d3 = self.decoder3(y, skip2)
        y = act(self.decoder4_norm(self.decoder4_conv(torch.cat([y, skip1], 1))))
        logits = self.head4(y) + up(up(self.head2(d2)) + self.head3(d3))
        return logits[(...,) + tuple(slice(0, s) for s in size)]


def max_pool2(x):
    """2x2x2 max pooling. Written as a reshape because F.max_pool3d's CUDA backward uses atomic adds, which
    would make seeded GPU runs differ; the forward is identical. Sides are even (padded to a multiple of 8)."""
    n, c, d, h, w = x.shape
    return x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2).amax(dim=(3, 5, 7))


def double_conv(cin, cmid, cout):
    """Cicek's level: two 3x3x3 convolutions, each followed by batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv3d(cin, cmid, 3, padding=1), nn.BatchNorm3d(cmid), nn.ReLU(inplace=True),
        nn.Conv3d(cmid, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """3D U-Net baseline (Cicek et al. 2016), padded so that the output has the input's size.

    Args:
        in_channels: input MR channels (the paper: 1).
        out_channels: output logit channels (the paper: 1).
        base_filters: channels of the first convolution (Cicek: 32); levels are 32,64 / 64,128 /
            128,256 / bottom 256,512, doubling before each max pool as in Cicek.

    Analysis path: double conv, 2x2x2 max pool, three times, then the bottom double conv. Synthesis path:
    2x2x2 stride-2 up-convolution keeping the channels, concatenation with the skip, double conv. A 1x1x1
    convolution with bias gives the logits. With batch size 1, batch norm in training normalises over one
    volume; evaluation uses the running statistics. With the defaults: 19,073,665 parameters.
    """

    multiple = 8

    def __init__(self, in_channels=1, out_channels=1, base_filters=32):
        super().__init__()
        f = base_filters
        self.analysis1 = double_conv(in_channels, f, 2 * f)
        self.analysis2 = double_conv(2 * f, 2 * f, 4 * f)
        self.analysis3 = double_conv(4 * f, 4 * f, 8 * f)
        self.bottom = double_conv(8 * f, 8 * f, 16 * f)
        self.up3, self.synthesis3 = nn.ConvTranspose3d(16 * f, 16 * f, 2, 2), double_conv(24 * f, 8 * f, 8 * f)
        self.up2, self.synthesis2 = nn.ConvTranspose3d(8 * f, 8 * f, 2, 2), double_conv(12 * f, 4 * f, 4 * f)
        self.up1, self.synthesis1 = nn.ConvTranspose3d(4 * f, 4 * f, 2, 2), double_conv(6 * f, 2 * f, 2 * f)
        self.head = nn.Conv3d(2 * f, out_channels, 1)

    def forward(self, x):
        x, size = pad_to_multiple(x, self.multiple)
        skip1 = self.analysis1(x)
        skip2 = self.analysis2(max_pool2(skip1))
        skip3 = self.analysis3(max_pool2(skip2))
        y = self.bottom(max_pool2(skip3))
        y = self.synthesis3(torch.cat([self.up3(y), skip3], 1))
        y = self.synthesis2(torch.cat([self.up2(y), skip2], 1))
        y = self.synthesis1(torch.cat([self.up1(y), skip1], 1))
        return self.head(y)[(...,) + tuple(slice(0, s) for s in size)]


MODELS = {"residual": ResidualUNet3D, "unet": UNet3D}


def build_model(name, **kwargs):
    """The one entry point of the command line: `residual` (Residual 3D U-Net) or `unet` (3D U-Net)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
