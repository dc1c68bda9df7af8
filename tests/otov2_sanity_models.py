"""Tiny versions of the architecture kinds in Only-Train-Once's upstream sanity-check suite.

OTO's repository checks its partition and ``construct_subnet`` with ``sanity_check/test_*.py``
over the models in ``sanity_check/backends`` (full-size, mostly at 224x224 or 512x512). These
are this project's own small re-statements of the same *kinds* of graph (a few channels,
8x8 to 32x32 inputs, random weights), so that every case runs on a CPU in about a second:

=====================  ====================================================================
kind                   what the graph exercises (upstream backend it stands for)
=====================  ====================================================================
``concat``             channel concat of a conv with a sum of two BNs of another conv
                       (``DemoNetConcatCase1``); ``concat2``: nested concats (``Case2``)
``convtranspose_in``   ConvTranspose2d, affine InstanceNorm, residual sum
                       (``DemoNetConvtransposeInCase1``); ``convtranspose_in2``: concats of
                       InstanceNorm'd convs and conv-transposes (``Case2``)
``instance_norm``      conv -> InstanceNorm -> LeakyReLU / PReLU chain
                       (``DemoNetInstanceNorm2DCase3`` / ``Case4``)
``weight_share``       one conv applied twice (``DemoNetWeightShareCase1``)
``batch_norm``         pre-activation BN ResBlocks, encoder convs and decoder
                       conv-transposes with skip concats (``DemonetBatchnormPruning``)
``group_conv``         depthwise + pointwise convs, InstanceNorm, a U-Net of
                       conv-transposes and concats (``DemoNetGroupConvCase1``)
``resnet``             BasicBlock ResNet-18 layout with downsampling shortcuts
                       (torchvision ``resnet18`` / ``resnet18_cifar10``)
``densenet``           DenseNet-BC bottlenecks, transitions (``densenet121``)
``vgg_bn``             conv-BN-ReLU stacks and max pools (torchvision ``vgg16_bn``)
``carn``               CARN cascading blocks: concats of residual blocks, 1x1 fusions,
                       frozen mean shift, PixelShuffle upsampler (``CarnNet``)
``convnext``           depthwise conv, channel LayerNorm (both data formats), inverted
                       bottleneck Linear layers, residual stream (``convnext_tiny``)
``diffusion_unet``     GroupNorm ResnetBlocks with timestep embedding, attention block,
                       down/up sampling and skip concats (``DiffModelCIFAR``)
=====================  ====================================================================

Every model takes one tensor and returns one tensor (multi-input upstream models split the
channels of that tensor), so a single helper compares full model and subnet.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SANITY_MODELS", "build"]


class ConcatCase1(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn_1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn_2 = nn.BatchNorm2d(2 * c)
        self.bn_3 = nn.BatchNorm2d(2 * c)
        self.bn_4 = nn.BatchNorm2d(3 * c)
        self.conv5 = nn.Conv2d(3 * c, 4 * c, 3, padding=1)
        self.fc1 = nn.Linear(4 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1 = F.relu(self.bn_1(self.conv1(x)))
        t = self.conv2(x1)
        x2 = self.bn_2(t) + self.bn_3(t) + self.conv3(x1)
        x5 = self.conv5(self.bn_4(torch.cat([x1, x2], 1)))
        return self.fc2(self.fc1(F.adaptive_avg_pool2d(x5, 1).flatten(1)))


class ConcatCase2(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn_1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn_2 = nn.BatchNorm2d(2 * c)
        self.bn_3 = nn.BatchNorm2d(2 * c)
        self.conv5 = nn.Conv2d(3 * c, 4 * c, 3, padding=1)
        self.conv6 = nn.Conv2d(6 * c, 8 * c, 3, padding=1)
        self.bn_4 = nn.BatchNorm2d(12 * c)
        self.fc1 = nn.Linear(12 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1 = F.relu(self.bn_1(self.conv1(x)))
        t = self.conv2(x1)
        x2 = self.bn_2(t) + self.bn_3(t) + self.conv3(x1)
        x5 = self.conv5(torch.cat([x1, x2], 1))
        x6 = self.conv6(torch.cat([x5, x2], 1))
        x6 = self.bn_4(torch.cat([x6, x5], 1))
        return self.fc2(self.fc1(F.adaptive_avg_pool2d(x6, 1).flatten(1)))


class ConvTransposeInCase1(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.in_1 = nn.InstanceNorm2d(c, affine=True)
        self.in_2 = nn.InstanceNorm2d(c, affine=True)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * c, 4 * c, 3, padding=1)
        self.in_3 = nn.InstanceNorm2d(2 * c, affine=True)
        self.convt6 = nn.ConvTranspose2d(4 * c, 8 * c, 3, padding=1)
        self.in_6 = nn.InstanceNorm2d(8 * c, affine=True)
        self.conv8 = nn.Conv2d(8 * c, 4 * c, 3, padding=1)
        self.conv9 = nn.Conv2d(8 * c, 4 * c, 3, padding=1)
        self.in_8 = nn.InstanceNorm2d(4 * c, affine=True)
        self.in_9 = nn.InstanceNorm2d(4 * c, affine=True)
        self.conv10 = nn.Conv2d(4 * c, 4 * c, 3, padding=1)
        self.fc1 = nn.Linear(4 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1 = self.conv1(x)
        a = self.conv3(F.leaky_relu(self.in_1(x1)))
        b = self.conv4(F.leaky_relu(self.in_3(self.conv2(F.leaky_relu(self.in_2(x1))))))
        h = F.leaky_relu(self.in_6(self.convt6(a + b)))
        h = self.in_8(self.conv8(h)) + self.in_9(self.conv9(h))
        h = F.adaptive_avg_pool2d(self.conv10(h), 1).flatten(1)
        return self.fc2(self.fc1(h))


class ConvTransposeInCase2(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.in_1 = nn.InstanceNorm2d(c, affine=True)
        self.in_2 = nn.InstanceNorm2d(c, affine=True)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * c, 4 * c, 3, padding=1)
        self.in_3 = nn.InstanceNorm2d(2 * c, affine=True)
        self.in_6 = nn.InstanceNorm2d(8 * c, affine=True)
        self.in_4 = nn.InstanceNorm2d(4 * c, affine=True)
        self.in_5 = nn.InstanceNorm2d(4 * c, affine=True)
        self.conv5 = nn.Conv2d(8 * c, 4 * c, 3, padding=1)
        self.convt6 = nn.ConvTranspose2d(8 * c, 4 * c, 3, padding=1)
        self.convt7 = nn.ConvTranspose2d(8 * c, 4 * c, 3, padding=1)
        self.conv8 = nn.Conv2d(4 * c, 6 * c, 3, padding=1)
        self.convt9 = nn.ConvTranspose2d(4 * c, 6 * c, 3, padding=1)
        self.fc1 = nn.Linear(6 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1 = self.conv1(x)
        a = self.conv3(F.leaky_relu(self.in_1(x1)))
        b = self.conv4(F.leaky_relu(self.in_3(self.conv2(F.leaky_relu(self.in_2(x1))))))
        h = F.leaky_relu(self.in_6(torch.cat([a, b], 1)))
        h = F.leaky_relu(torch.cat([self.in_4(self.conv5(h)), self.in_5(self.convt6(h))], 1))
        h = F.leaky_relu(self.convt7(h))
        h = F.leaky_relu(self.conv8(h)) + F.leaky_relu(self.convt9(h))
        return self.fc2(self.fc1(F.adaptive_avg_pool2d(h, 1).flatten(1)))


class InstanceNormChain(nn.Module):
    """``prelu=False``: DemoNetInstanceNorm2DCase3 (LeakyReLU); True: Case4 (per-channel PReLU)."""

    def __init__(self, c=8, prelu=False):
        super().__init__()
        chans = [3, c, 2 * c, 4 * c, 8 * c]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(nn.InstanceNorm2d(b, affine=True) for b in chans[1:])
        self.acts = nn.ModuleList((nn.PReLU(b) if prelu else nn.LeakyReLU())
                                  for b in chans[1:])
        self.fc1 = nn.Linear(8 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            x = act(norm(conv(x)))
        return self.fc2(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class WeightShareCase1(nn.Module):
    """``conv2`` is applied twice to the same input (DemoNetWeightShareCase1)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn_1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn_2 = nn.BatchNorm2d(2 * c)
        self.bn_3 = nn.BatchNorm2d(2 * c)
        self.bn_4 = nn.BatchNorm2d(3 * c)
        self.conv5 = nn.Conv2d(3 * c, 4 * c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(4 * c, 2 * c)
        self.fc2 = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1 = self.relu(self.bn_1(self.conv1(x)))
        t = self.conv2(x1)
        x3 = self.conv2(x1)
        x2 = self.bn_2(t) + self.bn_3(t) + x3
        x5 = self.conv5(self.bn_4(torch.cat([x1, x2], 1)))
        return self.fc2(self.fc1(F.adaptive_avg_pool2d(x5, 1).flatten(1)))


class _PreActResBlock(nn.Module):
    def __init__(self, cin, cout, transpose):
        super().__init__()
        up = dict(kernel_size=3, stride=2, padding=1)
        self.norm_0 = nn.BatchNorm2d(cin)
        self.norm_1 = nn.BatchNorm2d(cout)
        self.norm_s = nn.BatchNorm2d(cin)
        self.conv_0 = nn.Conv2d(cin, cout, 3, padding=1)
        if transpose:
            self.conv_1 = nn.ConvTranspose2d(cout, cout, output_padding=1, **up)
            self.conv_s = nn.ConvTranspose2d(cin, cout, output_padding=1, **up)
        else:
            self.conv_1 = nn.Conv2d(cout, cout, **up)
            self.conv_s = nn.Conv2d(cin, cout, **up)

    def forward(self, x):
        dx = self.conv_1(F.leaky_relu(self.norm_1(self.conv_0(F.leaky_relu(self.norm_0(x))))))
        return self.conv_s(F.leaky_relu(self.norm_s(x))) + dx


class BatchNormEncoderDecoder(nn.Module):
    """DemonetBatchnormPruning: input split into 3 parts and concatenated, 2 encoder and 1
    decoder pre-activation BN ResBlocks, skip concat, output conv."""

    def __init__(self, c=4):
        super().__init__()
        self.input_layer = nn.Conv2d(3, c, 3, padding=1)
        self.encoder0 = _PreActResBlock(c, 2 * c, transpose=False)
        self.encoder1 = _PreActResBlock(2 * c, 4 * c, transpose=False)
        self.decoder1 = _PreActResBlock(4 * c, 2 * c, transpose=True)
        self.output_layer = nn.Conv2d(4 * c, 4 * c, 3, padding=1)

    def forward(self, x):
        x = torch.cat([x[:, :1], x[:, 1:2], x[:, 2:]], 1)
        out = self.input_layer(x)
        e0 = self.encoder0(out)
        e1 = self.encoder1(e0)
        d1 = torch.cat([self.decoder1(e1), e0], 1)
        return self.output_layer(d1)


class _DepthConv(nn.Module):
    def __init__(self, cin, cout, k, stride, pad, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, k, stride, pad, dilation=dilation, groups=cin)
        self.conv2 = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class GroupConvUNet(nn.Module):
    """DemoNetGroupConvCase1 at 1/8 width: depthwise-separable encoder with InstanceNorm,
    conv-transpose decoder with skip concats; returns the classifier output."""

    def __init__(self, c=6):
        super().__init__()
        ch = [c, 2 * c, 4 * c, 8 * c]
        self.conv_1 = _DepthConv(6, ch[0], 5, 2, 2)
        self.in_1 = nn.InstanceNorm2d(ch[0], affine=True)
        self.conv_2 = _DepthConv(ch[0], ch[1], 3, 2, 1)
        self.in_2 = nn.InstanceNorm2d(ch[1], affine=True)
        self.conv_3 = _DepthConv(ch[1], ch[2], 3, 2, 1)
        self.in_3 = nn.InstanceNorm2d(ch[2], affine=True)
        self.conv_4 = _DepthConv(ch[2], ch[3], 3, 2, 1)
        self.in_4 = nn.InstanceNorm2d(ch[3], affine=True)
        self.convt_5 = nn.ConvTranspose2d(ch[3], ch[2], 3, stride=2, padding=1, output_padding=1)
        self.in_5 = nn.InstanceNorm2d(ch[2], affine=True)
        self.convt_6 = nn.ConvTranspose2d(2 * ch[2], ch[1], 3, stride=2, padding=1,
                                          output_padding=1)
        self.in_6 = nn.InstanceNorm2d(ch[1], affine=True)
        self.convt_7 = nn.ConvTranspose2d(2 * ch[1], ch[0], 3, stride=2, padding=1,
                                          output_padding=1)
        self.in_7 = nn.InstanceNorm2d(ch[0], affine=True)
        self.conv_8 = nn.Conv2d(2 * ch[0], 2 * ch[0], 3, padding=1)
        self.fc1 = nn.Linear(2 * ch[0], ch[0])
        self.fc2 = nn.Linear(ch[0], 10)

    def forward(self, x):
        x = torch.cat([x, x.flip(1)], 1)  # upstream concatenates two 3-channel images
        x0 = F.leaky_relu(self.in_1(self.conv_1(x)))
        d1 = F.leaky_relu(self.in_2(self.conv_2(x0)))
        d2 = F.leaky_relu(self.in_3(self.conv_3(d1)))
        d3 = F.leaky_relu(self.in_4(self.conv_4(d2)))
        u1 = torch.cat([self.in_5(self.convt_5(d3)), d2], 1)
        u2 = torch.cat([self.in_6(self.convt_6(u1)), d1], 1)
        u3 = torch.cat([self.in_7(self.convt_7(u2)), x0], 1)
        h = F.adaptive_avg_pool2d(self.conv_8(u3), 1).flatten(1)
        return self.fc2(self.fc1(h))


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Style(nn.Module):
    """ResNet-18 layout (2 BasicBlocks per stage, 4 stages) at widths c, 2c, 4c, 8c."""

    def __init__(self, c=4, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        layers, cin = [], c
        for i, n in enumerate(blocks):
            cout = c * 2 ** i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _DenseBottleneck(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetStyle(nn.Module):
    """DenseNet-BC (bottleneck, transitions with compression 0.5), densenet121's 4 dense
    blocks with 2 layers each and growth rate 4."""

    def __init__(self, growth=4, blocks=(2, 2, 2, 2)):
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        feats = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                feats.append(_DenseBottleneck(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = c // 2
                feats.append(nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, out, 1, bias=False),
                                           nn.AvgPool2d(2)))
                c = out
        feats += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*feats)
        self.linear = nn.Linear(c, 10)

    def forward(self, x):
        x = self.features(self.conv1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGGBN(nn.Module):
    """vgg16_bn's conv-BN-ReLU / max-pool pattern (3 stages) with a two-layer classifier."""

    def __init__(self, cfg=(8, 8, "M", 16, 16, "M", 32, 32, "M")):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _CarnResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return F.relu(self.body(x) + x)


class _CarnCascade(nn.Module):
    """CARN's cascading block: three residual blocks, each output concatenated with all
    previous features and fused by a 1x1 conv + ReLU."""

    def __init__(self, c):
        super().__init__()
        self.b = nn.ModuleList(_CarnResidual(c) for _ in range(3))
        self.c = nn.ModuleList(nn.Sequential(nn.Conv2d(c * (i + 2), c, 1), nn.ReLU())
                               for i in range(3))

    def forward(self, x):
        cat, o = x, x
        for b, fuse in zip(self.b, self.c):
            cat = torch.cat([cat, b(o)], 1)
            o = fuse(cat)
        return o


class CarnStyle(nn.Module):
    """CarnNet (scale 2) at width c: frozen mean-shift 1x1 convs, entry conv, cascading
    blocks inside a cascade, PixelShuffle upsampler, exit conv."""

    def __init__(self, c=8, n_blocks=2):
        super().__init__()
        mean = torch.tensor([0.4488, 0.4371, 0.4040])
        self.sub_mean = nn.Conv2d(3, 3, 1)
        self.add_mean = nn.Conv2d(3, 3, 1)
        for conv, sign in ((self.sub_mean, -1.0), (self.add_mean, 1.0)):
            conv.weight.data = torch.eye(3).view(3, 3, 1, 1)
            conv.bias.data = sign * mean
            for p in conv.parameters():
                p.requires_grad = False
        self.entry = nn.Conv2d(3, c, 3, 1, 1)
        self.blocks = nn.ModuleList(_CarnCascade(c) for _ in range(n_blocks))
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(c * (i + 2), c, 1), nn.ReLU())
                                  for i in range(n_blocks))
        self.upsample = nn.Sequential(nn.Conv2d(c, 4 * c, 3, 1, 1), nn.ReLU(),
                                      nn.PixelShuffle(2))
        self.exit = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, x):
        x = self.entry(self.sub_mean(x))
        cat, o = x, x
        for block, fuse in zip(self.blocks, self.fuse):
            cat = torch.cat([cat, block(o)], 1)
            o = fuse(cat)
        return self.add_mean(self.exit(self.upsample(o)))


class LayerNorm(nn.Module):
    """ConvNeXt's channel ``LayerNorm`` (OTO maps modules by class name): channels_last uses F.layer_norm
    over the last dim, channels_first normalises over dim 1 by hand."""

    def __init__(self, c, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (c,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtStyle(nn.Module):
    """convnext_tiny's layout (``layer_scale_init_value=-1`` as in the upstream test) with
    one block per stage and dims (8, 16, 24, 32)."""

    def __init__(self, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, dims[0], 4, stride=4),
            LayerNorm(dims[0], data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[_ConvNeXtBlock(d) for _ in range(n)])
                                    for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], 10)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


def _swish(x):
    return x * torch.sigmoid(x)


def _timestep_embedding(t, dim):
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    emb = t.float()[:, None] * freq[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


class _DiffResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(_swish(self.norm1(x)))
        h = h + self.temb_proj(_swish(temb))[:, :, None, None]
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _DiffAttn(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))
        # upstream scales by int(c) ** -0.5 of the *runtime* width, which changes when q/k
        # channels are pruned (so its subnet cannot match); fixed at construction here
        self.scale = c ** -0.5

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww))
        w = F.softmax(w * self.scale, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class DiffusionUNet(nn.Module):
    """DiffModel (the DDPM U-Net of ``DiffModelCIFAR``): timestep embedding MLP, GroupNorm
    ResnetBlocks, a conv downsample, a middle attention block, nearest upsample + conv,
    skip concats. Input: 3 image channels and the timestep as a 4th constant channel."""

    def __init__(self, ch=8, groups=4):
        super().__init__()
        self.ch = ch
        temb = 4 * ch
        self.temb_dense0 = nn.Linear(ch, temb)
        self.temb_dense1 = nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down0 = _DiffResBlock(ch, ch, temb, groups)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2)
        self.down1 = _DiffResBlock(ch, 2 * ch, temb, groups)
        self.mid_1 = _DiffResBlock(2 * ch, 2 * ch, temb, groups)
        self.mid_attn = _DiffAttn(2 * ch, groups)
        self.mid_2 = _DiffResBlock(2 * ch, 2 * ch, temb, groups)
        self.up1 = _DiffResBlock(4 * ch, 2 * ch, temb, groups)
        self.up1b = _DiffResBlock(3 * ch, 2 * ch, temb, groups)
        self.upsample = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up0 = _DiffResBlock(3 * ch, ch, temb, groups)
        self.up0b = _DiffResBlock(2 * ch, ch, temb, groups)
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, concat):
        x, t = concat[:, :3], concat[:, 3, 0, 0]
        temb = self.temb_dense1(_swish(self.temb_dense0(_timestep_embedding(t, self.ch))))
        h0 = self.conv_in(x)
        h1 = self.down0(h0, temb)
        h2 = self.downsample(F.pad(h1, (0, 1, 0, 1)))
        h3 = self.down1(h2, temb)
        h = self.mid_2(self.mid_attn(self.mid_1(h3, temb)), temb)
        h = self.up1(torch.cat([h, h3], 1), temb)
        h = self.up1b(torch.cat([h, h2], 1), temb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0(torch.cat([h, h1], 1), temb)
        h = self.up0b(torch.cat([h, h0], 1), temb)
        return self.conv_out(_swish(self.norm_out(h)))


#: kind -> (constructor, input shape without the batch dim)
SANITY_MODELS = {
    "concat": (ConcatCase1, (3, 8, 8)),
    "concat2": (ConcatCase2, (3, 8, 8)),
    "convtranspose_in": (ConvTransposeInCase1, (3, 8, 8)),
    "convtranspose_in2": (ConvTransposeInCase2, (3, 8, 8)),
    "instance_norm": (InstanceNormChain, (3, 8, 8)),
    "instance_norm_prelu": (lambda: InstanceNormChain(prelu=True), (3, 8, 8)),
    "weight_share": (WeightShareCase1, (3, 8, 8)),
    "batch_norm": (BatchNormEncoderDecoder, (3, 16, 16)),
    "group_conv": (GroupConvUNet, (3, 32, 32)),
    "resnet": (ResNet18Style, (3, 16, 16)),
    "densenet": (DenseNetStyle, (3, 16, 16)),
    "vgg_bn": (VGGBN, (3, 16, 16)),
    "carn": (CarnStyle, (3, 8, 8)),
    "convnext": (ConvNeXtStyle, (3, 32, 32)),
    "diffusion_unet": (DiffusionUNet, (4, 8, 8)),
}


def build(kind: str, seed: int = 0, batch: int = 2):
    """``(model, inputs)``: the tiny model of ``kind`` (seeded) and a seeded input batch."""
    ctor, shape = SANITY_MODELS[kind]
    torch.manual_seed(seed)
    model = ctor()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((batch,) + shape, generator=g)
    if kind == "diffusion_unet":
        x[:, 3] = torch.randint(0, 1000, (batch, 1, 1), generator=g).float()
    return model, x
