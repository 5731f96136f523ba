"""Second implementations of BiSeNetV1 with the module names of CoinCheung/BiSeNet and of
mmsegmentation.

Written independently of bisenet.py (their own ResNet, their upsampling styles) so that a state dict
taken from them checks both our key mapping and our numerics: same weights must give the same
logits.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TvBasic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TvBottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = (
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width)
            )
            if stride != 1 or cin != 4 * width
            else None
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TvResNet(nn.Module):
    """torchvision's ResNet names; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self, depth):
        super().__init__()
        block, counts = {18: (TvBasic, (2, 2, 2, 2)), 50: (TvBottleneck, (3, 4, 6, 3))}[depth]
        expansion = 1 if block is TvBasic else 4
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, width) in enumerate(zip(counts, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.layer1(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


# -- CoinCheung layout (cp.*, sp.*, ffm.*, conv_out*) ---------------------------------------------
# scale_factor upsampling, so inputs must be multiples of 32
class CcConvBNReLU(nn.Module):
    def __init__(self, cin, cout, ks=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class CcARM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = CcConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))


class CcContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = TvResNet(18)
        self.arm16, self.arm32 = CcARM(256, 128), CcARM(512, 128)
        self.conv_head32, self.conv_head16 = CcConvBNReLU(128, 128), CcConvBNReLU(128, 128)
        self.conv_avg = CcConvBNReLU(512, 128, 1, 1, 0)

    def forward(self, x):
        _, f16, f32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))
        up32 = self.conv_head32(
            F.interpolate(self.arm32(f32) + avg, scale_factor=2.0, mode="nearest")
        )
        up16 = self.conv_head16(
            F.interpolate(self.arm16(f16) + up32, scale_factor=2.0, mode="nearest")
        )
        return up16, up32


class CcSpatialPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = CcConvBNReLU(3, 64, 7, 2, 3)
        self.conv2 = CcConvBNReLU(64, 64, 3, 2, 1)
        self.conv3 = CcConvBNReLU(64, 64, 3, 2, 1)
        self.conv_out = CcConvBNReLU(64, 128, 1, 1, 0)

    def forward(self, x):
        return self.conv_out(self.conv3(self.conv2(self.conv1(x))))


class CcFFM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convblk = CcConvBNReLU(cin, cout, 1, 1, 0)
        self.conv = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], 1))
        atten = torch.sigmoid(self.bn(self.conv(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten + feat


class CcOutput(nn.Module):
    def __init__(self, cin, mid, n_classes, up_factor):
        super().__init__()
        self.conv = CcConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=True)
        self.up_factor = up_factor

    def forward(self, x):
        return F.interpolate(
            self.conv_out(self.conv(x)),
            scale_factor=self.up_factor,
            mode="bilinear",
            align_corners=False,
        )


class CoinCheungBiSeNetV1(nn.Module):
    """Expects inputs normalised with Cityscapes mean/std."""

    def __init__(self, n_classes=19):
        super().__init__()
        self.cp, self.sp = CcContextPath(), CcSpatialPath()
        self.ffm = CcFFM(256, 256)
        self.conv_out = CcOutput(256, 256, n_classes, 8)
        self.conv_out16 = CcOutput(128, 64, n_classes, 8)
        self.conv_out32 = CcOutput(128, 64, n_classes, 16)

    def forward(self, x):
        cp8, cp16 = self.cp(x)
        return self.conv_out(self.ffm(self.sp(x), cp8))


# -- mmseg layout ----------------------------------------------------------------------------------
# backbone.context_path.*, backbone.spatial_path.*, decode_head.*, auxiliary_head.N.*
class MmConvModule(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.act else x


class MmARM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv_layer = MmConvModule(cin, cout, 3, 1, 1)
        self.atten_conv_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), MmConvModule(cout, cout, 1, act=False), nn.Sigmoid()
        )

    def forward(self, x):
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)


class MmContextPath(nn.Module):
    def __init__(self, depth, channels):
        super().__init__()
        self.backbone = TvResNet(depth)
        self.arm16, self.arm32 = MmARM(channels[1], channels[0]), MmARM(channels[2], channels[0])
        self.conv_head32 = MmConvModule(channels[0], channels[0], 3, 1, 1)
        self.conv_head16 = MmConvModule(channels[0], channels[0], 3, 1, 1)
        self.gap_conv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), MmConvModule(channels[2], channels[0], 1)
        )

    def forward(self, x):
        f8, f16, f32 = self.backbone(x)
        up32 = self.conv_head32(
            F.interpolate(self.arm32(f32) + self.gap_conv(f32), size=f16.shape[2:], mode="nearest")
        )
        up16 = self.conv_head16(
            F.interpolate(self.arm16(f16) + up32, size=f8.shape[2:], mode="nearest")
        )
        return up16, up32


class MmSpatialPath(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.layer1 = MmConvModule(3, ch[0], 7, 2, 3)
        self.layer2 = MmConvModule(ch[0], ch[1], 3, 2, 1)
        self.layer3 = MmConvModule(ch[1], ch[2], 3, 2, 1)
        self.layer4 = MmConvModule(ch[2], ch[3], 1)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MmFFM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = MmConvModule(cin, cout, 1)
        self.conv_atten = nn.Sequential(
            MmConvModule(cout, cout, 1), nn.Sigmoid()
        )  # ReLU before the sigmoid

    def forward(self, sp, cp):
        fuse = self.conv1(torch.cat([sp, cp], 1))
        return fuse * self.conv_atten(F.adaptive_avg_pool2d(fuse, 1)) + fuse


class MmBackbone(nn.Module):
    def __init__(self, depth, spatial, context, out):
        super().__init__()
        self.context_path = MmContextPath(depth, context)
        self.spatial_path = MmSpatialPath(spatial)
        self.ffm = MmFFM(context[1], out)


class MmFCNHead(nn.Module):
    def __init__(self, cin, channels, n_classes):
        super().__init__()
        self.convs = nn.Sequential(MmConvModule(cin, channels, 3, 1, 1))
        self.conv_seg = nn.Conv2d(channels, n_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.convs(x))


class MmsegBiSeNetV1(nn.Module):
    """Expects inputs normalised with ImageNet mean/std."""

    def __init__(self, depth=18, n_classes=19):
        super().__init__()
        r18 = depth == 18
        spatial, context = (
            ((64, 64, 64, 128), (128, 256, 512))
            if r18
            else ((256, 256, 256, 512), (512, 1024, 2048))
        )
        out, aux = (256, 64) if r18 else (1024, 256)
        self.backbone = MmBackbone(depth, spatial, context, out)
        self.decode_head = MmFCNHead(out, out, n_classes)
        self.auxiliary_head = nn.ModuleList(
            [MmFCNHead(context[0], aux, n_classes), MmFCNHead(context[0], aux, n_classes)]
        )

    def forward(self, x):
        cp8, _ = self.backbone.context_path(x)
        fused = self.backbone.ffm(self.backbone.spatial_path(x), cp8)
        return F.interpolate(
            self.decode_head(fused), size=x.shape[2:], mode="bilinear", align_corners=False
        )


def randomize_batchnorm(model, generator=None):
    """Non-trivial running statistics and affine parameters, so folding and mapping mistakes
    show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.3, 0.3, generator=generator)
    return model
