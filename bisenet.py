"""BiSeNetV1 (Yu et al., ECCV 2018) with a ResNet context path, as in mmseg and CoinCheung/BiSeNet.
It takes RGB images of values 0..255 (uint8 or float) and normalises them itself, so the mean/std a
checkpoint was trained with travels with it. Parameters and GFLOPs: tools/model_info.py."""

import copy
import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import CheckpointError

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

# the model's one limit on training batches, said alike wherever it is met (train.py checks first)
BATCH_OF_TWO = (
    "BatchNorm on the 1x1 pooled attention maps needs at least 2 images per device; "
    "use --batch-size >= 2 (or --sync-bn on several devices)"
)
# the depths with a recipe and released weights
RESNET_LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
# mmseg's channels, ModelConfig's fields that default to None: spatial path, context path (C,
# layer3 in, layer4 in), fusion, main head, aux head
PRESETS = {
    "basic": ((64, 64, 64, 128), (128, 256, 512), 256, 256, 64),
    "bottleneck": ((256, 256, 256, 512), (512, 1024, 2048), 1024, 1024, 256),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model. Checkpoints and exported models store it as to_dict()'s
    plain dict; from_dict reads those of every earlier checkpoint. The channel widths default to
    mmseg's for the depth."""

    depth: int = 18
    num_classes: int = 19
    # mmseg's fusion attention has a ReLU before its sigmoid; CoinCheung's has none
    ffm_attention_relu: bool = True
    dropout: float = 0.1
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    spatial_channels: tuple = None
    context_channels: tuple = None
    fusion_channels: int = None
    head_channels: int = None
    aux_channels: int = None

    def __post_init__(self):
        if self.depth not in RESNET_LAYOUTS:
            raise CheckpointError(f"depth {self.depth} is not one of {sorted(RESNET_LAYOUTS)}")
        fields = dataclasses.fields(self)
        channels = [field.name for field in fields if field.default is None]
        preset = dict(zip(channels, PRESETS[RESNET_LAYOUTS[self.depth][0]]))
        for field in fields:
            value = getattr(self, field.name)
            value = preset[field.name] if value is None else value
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            object.__setattr__(self, field.name, value)

    def to_dict(self):
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, config, source):
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names) if isinstance(config, dict) else type(config).__name__
        if unknown:
            raise CheckpointError(
                f"{source}: its model_config is not one this code knows ({unknown}); "
                "it comes from another program or a newer version"
            )
        return cls(**config)


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, kernel_size=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


# -- ResNet with torchvision's parameter names (conv1, bn1, layer1..layer4) ----------------------
class Block(nn.Module):
    """torchvision's BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1 to 4x the width; the stride
    on the 3x3: torchvision/mmseg 'pytorch'): each convolution with a BatchNorm, ReLU between them
    and after the residual sum."""

    def __init__(self, cin, width, stride, bottleneck):
        super().__init__()
        convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, width * 4, 1, 1)]
        convs = convs if bottleneck else [(cin, width, 3, stride), (width, width, 3, 1)]
        for i, (conv_in, cout, kernel, conv_stride) in enumerate(convs, 1):
            conv = nn.Conv2d(conv_in, cout, kernel, conv_stride, kernel // 2, bias=False)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
        self.convs = len(convs)
        self.downsample = None
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(cout))

    def forward(self, x):
        out = x
        for i in range(1, self.convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = F.relu(out, inplace=True) if i < self.convs else out
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ResNet(nn.Module):
    def __init__(self, depth):
        super().__init__()
        block_kind, blocks = RESNET_LAYOUTS[depth]
        bottleneck = block_kind == "bottleneck"
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for j in range(count):
                layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = width * 4 if bottleneck else width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 3, 2, 1)
        x16 = self.layer3(self.layer2(self.layer1(x)))
        return x16, self.layer4(x16)


class ChannelAttention(nn.Module):
    """x * sigmoid(BN(conv1x1(mean over H, W))); mmseg's fusion module: ReLU before the sigmoid."""

    def __init__(self, channels, relu):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = relu

    def forward(self, x):
        if self.training and x.shape[0] < 2 and not isinstance(self.bn, nn.SyncBatchNorm):
            raise ValueError(BATCH_OF_TWO)
        attention = self.bn(self.conv(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(F.relu(attention) if self.relu else attention)


class AttentionRefinement(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.attention = ChannelAttention(cout, relu=False)

    def forward(self, x):
        return self.attention(self.conv(x))


class FeatureFusion(nn.Module):
    def __init__(self, cin, cout, attention_relu):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 1)
        self.attention = ChannelAttention(cout, relu=attention_relu)

    def forward(self, spatial, context):
        fused = self.conv(torch.cat([spatial, context], dim=1))
        return self.attention(fused) + fused


class SegHead(nn.Module):
    def __init__(self, cin, mid, num_classes, dropout):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x, size):
        # the loss runs in fp32 (apex O1)
        logits = self.classifier(self.dropout(self.conv(x))).float()
        if size is None:
            return logits
        if self.training:
            return bilinear_resize(logits, size)
        return F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=False)


def bilinear_taps(out_size, in_size):
    """F.interpolate(mode='bilinear', align_corners=False) along one axis: for each output position,
    the two source indices it reads and the weight of the second."""
    centres = torch.arange(out_size, dtype=torch.float64) + 0.5
    src = (centres * (in_size / out_size) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    return low, (low + 1).clamp(max=in_size - 1), src - low


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out_size, in_size, device):
    """Row i holds the interpolation weights of output position i."""
    low, high, frac = bilinear_taps(out_size, in_size)
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.float().to(device)


def bilinear_resize(x, size):
    """F.interpolate(bilinear, align_corners=False) as two matrix products, in fp32: training's
    backward is then two matmuls too, 2-3x faster on CPU than interpolate's scatter-add."""
    with torch.autocast(x.device.type, enabled=False):
        rows = bilinear_matrix(size[0], x.shape[2], x.device)
        return rows @ (x @ bilinear_matrix(size[1], x.shape[3], x.device).T)


@torch.no_grad()
def upsampled_classes(logits, size, *, rows=64):
    """argmax over classes of bilinear_resize(logits, size), a band of output rows at a time so that
    the full-size logits never leave the cache: a 1024x2048 image's class map in half the time."""
    height, width = logits.shape[2:]
    with torch.autocast(logits.device.type, enabled=False):
        widened = logits.float() @ bilinear_matrix(size[1], width, logits.device).T
        vertical = bilinear_matrix(size[0], height, logits.device)
        # the source rows a band reads: low[top] .. high[bottom - 1]
        low, high, _ = bilinear_taps(size[0], height)
        out = torch.empty(logits.shape[0], *size, dtype=torch.long, device=logits.device)
        for top in range(0, size[0], rows):
            bottom = min(top + rows, size[0])
            first, last = int(low[top]), int(high[bottom - 1]) + 1
            band = vertical[top:bottom, first:last] @ widened[:, :, first:last]
            out[:, top:bottom] = band.max(1).indices
    return out


def segmentation_heads(config):
    """{name: (the feature it reads, head)}: the main head first, then the auxiliary heads, which
    only training runs (each loss weighted by --aux-weight). Features: 'fused' (1/8), 'spatial'
    (1/8), 'context16' (the 1/16 branch, upsampled to 1/8), 'context32' (the 1/32 branch, upsampled
    to 1/16). A new head is a new entry here."""
    context, classes, dropout = config.context_channels[0], config.num_classes, config.dropout
    return {
        "head": ("fused", SegHead(config.fusion_channels, config.head_channels, classes, dropout)),
        "aux_head16": ("context16", SegHead(context, config.aux_channels, classes, dropout)),
        "aux_head32": ("context32", SegHead(context, config.aux_channels, classes, dropout)),
    }


class BiSeNetV1(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        context_channels, s = config.context_channels, config.spatial_channels
        c = context_channels[0]
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.backbone = ResNet(config.depth)
        self.spatial_path = nn.Sequential(
            ConvBNReLU(3, s[0], 7, 2),
            ConvBNReLU(s[0], s[1], 3, 2),
            ConvBNReLU(s[1], s[2], 3, 2),
            ConvBNReLU(s[2], s[3], 1),
        )
        self.arm16 = AttentionRefinement(context_channels[1], c)
        self.arm32 = AttentionRefinement(context_channels[2], c)
        self.global_context = ConvBNReLU(context_channels[2], c, 1)
        self.refine32 = ConvBNReLU(c, c, 3)
        self.refine16 = ConvBNReLU(c, c, 3)
        self.ffm = FeatureFusion(s[3] + c, config.fusion_channels, config.ffm_attention_relu)
        self.head_inputs = {}
        for name, (feature, head) in segmentation_heads(config).items():
            self.add_module(name, head)
            self.head_inputs[name] = feature
        self.reset_parameters()

    def classifiers(self):
        """Each head's classifier's parameter prefix: what fine-tuning on other classes replaces."""
        return tuple(f"{name}.classifier." for name in self.head_inputs)

    def reset_parameters(self):
        """mmseg's from-scratch initialisation as it runs: convolutions Kaiming normal (fan_out,
        ReLU), BatchNorm 1 and 0 but the last of each residual block 0 (zero_init_residual: each
        starts as the identity), the main classifier normal(0, 0.01). The auxiliary ones keep
        PyTorch's default: mmseg holds them in an nn.ModuleList, which mmcv's init_weights never
        enters."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.backbone.modules():
            if isinstance(block, Block):
                nn.init.zeros_(getattr(block, f"bn{block.convs}").weight)
        main, *auxiliary = (getattr(self, name).classifier for name in self.head_inputs)
        nn.init.normal_(main.weight, std=0.01)
        nn.init.zeros_(main.bias)
        for classifier in auxiliary:
            classifier.reset_parameters()

    def forward(self, images, upsample=True):
        """Training: every head's logits at input size, the main head's first. Eval: the main
        head's; upsample=False gives them at 1/8 resolution, for upsampled_classes()."""
        size = images.shape[2:]
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        x16, x32 = self.backbone(x)
        context32 = self.arm32(x32) + self.global_context(x32.mean((2, 3), keepdim=True))
        # nearest resize to the next map's exact size: inputs need not be multiples of 32
        up32 = self.refine32(F.interpolate(context32, size=x16.shape[2:], mode="nearest"))
        spatial = self.spatial_path(x)
        up16 = F.interpolate(self.arm16(x16) + up32, size=spatial.shape[2:], mode="nearest")
        up16 = self.refine16(up16)
        fused = self.ffm(spatial, up16)
        if not self.training:
            return self.head(fused, size if upsample else None)
        features = {"fused": fused, "spatial": spatial, "context16": up16, "context32": up32}
        return tuple(getattr(self, name)(features[f], size) for name, f in self.head_inputs.items())


@torch.no_grad()
def fuse_bn(model):
    """An eval-mode copy, every BatchNorm folded into the convolution registered just before it."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        conv = None
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                conv_bias = conv.bias if conv.bias is not None else 0
                conv.bias = nn.Parameter(child.bias + (conv_bias - child.running_mean) * scale)
                conv.weight.data = conv.weight * scale.view(-1, 1, 1, 1)
                setattr(module, name, nn.Identity())
            conv = child
    return model
