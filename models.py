"""Model definitions: everything needed to rebuild a trained model from its checkpoint.

Every model is split the way the AELF paper splits it (Sec. 3.1): a feature extractor ``c``
mapping x to the penultimate embedding f, and a final linear layer ``w`` (``self.fc``):

    x --c--> f = model.features(x)  (B x D) --w--> logits = model.fc(f)

and ``model(x) == model.fc(model.features(x))``. The feature extractor itself is a list of
``stages`` (conv blocks / residual stages) followed by ``pool`` (the map from the last stage's
feature maps to f), so later methods can reach the intermediate feature maps A_l
(AGAIN's ASE head, class activation maps) without knowing the architecture.

Use ``build(name, num_classes, in_channels, **kw)``; the returned model remembers its name and
constructor arguments (``arch_name``, ``arch_kwargs``) so checkpoints can rebuild it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def make_act(act, slope=0.01):
    """'relu' or 'leakyrelu' (AELFs prefers LeakyReLU: ReLU units can lock after ST init)."""
    if act == 'relu':
        return nn.ReLU(inplace=True)
    if act == 'leakyrelu':
        return nn.LeakyReLU(slope, inplace=True)
    raise ValueError(f"unknown activation {act!r} (use relu or leakyrelu)")


class ASEHead(nn.Module):
    """AGAIN's Attribution Span Enlargement head (AGAIN Sec. 4.1, Eq. (4)) on feature maps A.

    ASE logits = linear(GAP(A)) (its own C -> classes layer, weight W_ase). The maps that
    continue through the network are
      training (labels given): A_hat = alpha * A * W_ase[y] + (1 - alpha) * A * W_ase[y_fake]
      inference (no labels):   A_hat = A * W_ase[pred],  pred = argmax of the ASE logits
    where W_ase[k] (the k-th row) scales each channel. As in the authors' code, the scales are
    not detached: the main loss also trains W_ase through A_hat.

    ``inference`` picks what happens without labels: 'argmax' (the paper's inference path);
    'surrogate', the same forward values with the backward pass of the softmax-weighted sum of
    the rows (BPDA, Athalye et al. 2018), so that an attack sees how the ASE logits move the
    scaling (eval.py's adaptive attack); 'none', no scaling at all (a diagnostic: what the main
    head reads from the maps alone)."""

    INFERENCE = ('argmax', 'surrogate', 'none')

    def __init__(self, channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, a, y=None, y_fake=None, alpha=0.6, inference='argmax'):
        logits = self.fc(a.mean(dim=(2, 3)))                         # GAP -> ASE logits
        w = self.fc.weight
        if y is None:
            if inference not in self.INFERENCE:
                raise ValueError(f"inference must be one of {self.INFERENCE}, not {inference!r}")
            if inference == 'none':
                return a, logits
            scale = w[logits.argmax(1)]                              # inference: W_ase[pred]
            if inference == 'surrogate':     # forward: exactly W_ase[pred]; backward: softmax rows
                soft = logits.float().softmax(1) @ w.float()
                scale = scale + (soft - soft.detach()).to(scale.dtype)
        else:
            scale = alpha * w[y] + (1 - alpha) * w[y_fake]           # Eq. (4)
        return a * scale[:, :, None, None].to(a.dtype), logits


class StagedNet(nn.Module):
    """Base: features(x) = pool(stages(x)); forward(x) = fc(features(x)).

    Optionally (``build(..., ase_layer=l)``) an AGAIN ASE head sits after stage l; ``model(x)``
    then uses its inference behaviour, and ``forward_heads`` gives both heads' logits."""

    first_stage_number = 0      # number of stages[0]: 0 when it is a stem (ResNets), else 1
    ase_index = None            # index into stages of the ASE head (self.ase), if any

    def add_ase(self, layer):
        """Attach an ASE head after stage ``layer`` (ResNet-18: 1-4 = layer1-layer4;
        cnn_b: 1-5 = conv block 1-5)."""
        index = layer - self.first_stage_number
        if not 0 <= index < len(self.stages):
            raise ValueError(f"ase_layer {layer} is not a stage of this model "
                             f"({self.first_stage_number}-{self.first_stage_number + len(self.stages) - 1})")
        channels = [m for m in self.stages[index].modules()
                    if hasattr(m, 'num_features') or hasattr(m, 'out_channels')][-1]
        channels = getattr(channels, 'num_features', None) or channels.out_channels
        self.ase = ASEHead(channels, self.fc.out_features)
        self.ase_index = index

    def stage_index(self, layer):
        return layer - self.first_stage_number

    def feature_maps(self, x):
        """Output of the last stage (B x C x H x W), before ``pool``."""
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == self.ase_index:
                x, _ = self.ase(x)                                   # ASE inference path
        return x

    def features(self, x):
        return self.pool(self.feature_maps(x))

    def forward(self, x):
        return self.fc(self.features(x))

    def cam_maps(self, x):
        """The maps the classifier reads through global average pooling (for class activation
        maps, AGAIN Eq. (1)); models whose classifier reads them otherwise raise ValueError."""
        if not (isinstance(self.pool, nn.Sequential) and isinstance(self.pool[0], nn.AdaptiveAvgPool2d)):
            raise ValueError(f"{type(self).__name__} does not classify globally average-pooled maps")
        return self.feature_maps(x)

    def forward_heads(self, x, y=None, y_fake=None, alpha=0.6, transform=None, transform_index=None,
                      ase_inference='argmax'):
        """(main logits, ASE logits or None). With ``y``/``y_fake`` the ASE head uses its
        training weighting (Eq. (4)), without them its inference weighting (``ase_inference``:
        see ASEHead). ``transform``
        (e.g. AGAIN's HFF) is applied to the maps of stage ``transform_index`` (default: the
        ASE stage) before the ASE head sees them; the model knows nothing of what it does."""
        if transform_index is None:
            transform_index = self.ase_index
        ase_logits = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == transform_index and transform is not None:
                x = transform(x)
            if i == self.ase_index:
                x, ase_logits = self.ase(x, y, y_fake, alpha, ase_inference)
        return self.fc(self.pool(x)), ase_logits


class CNNB(StagedNet):
    """CNN_B of AELF Table 1: five 3x3 convs (64, 64, 128, 256, 512), each with BatchNorm and
    LeakyReLU; average pooling 2x2 after convs 2, 3, 4 and 4x4 after conv 5; linear 512 ->
    classes. Built for 32x32 inputs (MNIST is resized to 32x32, AELF Appendix C).
    ``width`` scales every channel count (1.0 = the paper's model; smaller for CPU runs).

    The final 4x4 average pool acts on conv 5's 4x4 maps, so it is a global average pool: it is
    ``self.pool`` (adaptive, identical on 32x32 inputs and their multiples), and stage 5 ends at
    conv 5's activation. So conv 5's 4x4 maps are what ``feature_maps`` returns, what CAM reads
    and where an ASE head after block 5 sits (AGAIN Fig. 2: "the second last layer"). Pooling
    has no parameters: the state dict is the same as when the pool sat inside stage 5."""

    def __init__(self, num_classes=10, in_channels=1, width=1.0, act='leakyrelu', slope=0.01):
        super().__init__()
        chans = [max(1, int(round(c * width))) for c in (64, 64, 128, 256, 512)]
        pools = [None, 2, 2, 2, None]        # conv 5's 4x4 pool is the global pool below
        stages, c_in = [], in_channels
        for c_out, pool in zip(chans, pools):
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                      make_act(act, slope)]
            if pool:
                layers.append(nn.AvgPool2d(pool))
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.first_stage_number = 1          # stages[0] is conv block 1
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in


class MadryCNN(StagedNet):
    """The MNIST CNN of Madry et al. (2018): conv 5x5 32, max-pool 2, conv 5x5 64, max-pool 2,
    FC 1024, FC classes (ReLU). Its embedding f is the 1024-d FC output, so ``pool`` holds
    flatten + FC 1024 + ReLU."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2)),
        ])
        side = image_size // 4
        self.pool = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 1024),
                                  nn.ReLU(inplace=True))
        self.fc = nn.Linear(1024, num_classes)
        self.feature_dim = 1024


class BasicBlock(nn.Module):
    """ResNet basic block (post-activation)."""

    def __init__(self, c_in, c_out, stride, act, slope):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act1, self.act2 = make_act(act, slope), make_act(act, slope)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(StagedNet):
    """The usual CIFAR ResNet-18: 3x3 stem (no max-pool), four stages of two basic blocks
    (64, 128, 256, 512), global average pooling, linear 512 -> classes.
    stages[0] is the stem, stages[1..4] are layer1..layer4 (AGAIN's ``ase_layer`` 1-4)."""

    def __init__(self, num_classes=10, in_channels=3, act='relu', slope=0.01, width=1.0):
        super().__init__()
        chans = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
                             nn.BatchNorm2d(chans[0]), make_act(act, slope))
        stages, c_in = [stem], chans[0]
        for i, c_out in enumerate(chans):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride, act, slope),
                                        BasicBlock(c_out, c_out, 1, act, slope)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016) with optional dropout."""

    def __init__(self, c_in, c_out, stride, dropout, act, slope):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = make_act(act, slope)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = make_act(act, slope)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        o = self.act1(self.bn1(x))
        y = self.conv1(o)
        y = self.act2(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(StagedNet):
    """WRN-depth-widen (WRN-34-10, WRN-28-10, WRN-40-k with dropout 0.2 in the AELF tables).
    stages[0] is the first conv, stages[1..3] the three groups (the last ends with BN + act)."""

    def __init__(self, num_classes=10, in_channels=3, depth=34, widen_factor=10, dropout=0.0,
                 act='relu', slope=0.01):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (e.g. 28, 34, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        stages = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        c_in = widths[0]
        for g, c_out in enumerate(widths[1:]):
            blocks = [WideBlock(c_in if i == 0 else c_out, c_out, (1 if g == 0 else 2) if i == 0 else 1,
                                dropout, act, slope) for i in range(n)]
            if g == 2:
                blocks += [nn.BatchNorm2d(c_out), make_act(act, slope)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in


class AttentionPool(nn.Module):
    """The non-linear attention of AT-att-id Sec. 3.2 at one layer.

    For every spatial location n a small ReLU MLP scores the concatenation [l_n ; g] (Eq. (3)),
    a softmax over the N locations gives the weights a_n (Eq. (4)), and the attended feature
    is h = sum_n a_n l_n (Eq. (5)). The MLP's first layer on [l_n ; g] is written as
    W_l l_n + W_g g (the same linear map, split), so it runs as a 1x1 convolution."""

    def __init__(self, local_channels, global_dim, hidden=64):
        super().__init__()
        self.local = nn.Conv2d(local_channels, hidden, 1, bias=True)   # W_l (and the bias)
        self.glob = nn.Linear(global_dim, hidden, bias=False)          # W_g
        self.score = nn.Conv2d(hidden, 1, 1)                           # hidden -> c_n

    def forward(self, local, g):
        """local: B x C x H x W, g: B x D -> (h: B x C, a: B x H x W)."""
        b, c, hgt, wid = local.shape
        hidden = F.relu(self.local(local) + self.glob(g)[:, :, None, None])
        scores = self.score(hidden).flatten(1)                       # Eq. (3): c_n, B x N
        a = torch.softmax(scores.float(), dim=1).to(local.dtype)     # Eq. (4)
        h = torch.einsum('bn,bcn->bc', a, local.flatten(2))          # Eq. (5)
        return h, a.view(b, hgt, wid)


class CifarResNet(StagedNet):
    """The CIFAR ResNet of AT-att-id Sec. 4.2 (the "original" ResNet of Madry et al.'s CIFAR
    code): a 3x3 conv with 16 filters, then three residual stages with 16, 32 and 64 filters
    ("four residual blocks with [16, 16, 32, 64] filters"), ``blocks`` basic blocks each (5 in
    Madry et al.'s code), strides 1, 2, 2.

    ``attention=False``: global average pooling after the last stage (the plain model).
    ``attention=True`` (``att_resnet``): the global feature g comes from a conv layer between
    two max-pools after block 4 (8x8 -> max-pool 2 -> 3x3 conv, no padding -> max-pool 2 ->
    1x1, so g has 64 dimensions); an AttentionPool at blocks 3 and 4 (the 32- and 64-filter
    stages) gives h3, h4, and features(x) = [h3 ; h4] (96-d) replaces g for the final linear
    layer: the "attention-weighted global descriptor" that the implicit-denoising term uses."""

    def __init__(self, num_classes=10, in_channels=3, blocks=5, attention=False, hidden=64):
        super().__init__()
        chans = [16, 16, 32, 64]
        stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
                             nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        stages, c_in = [stem], chans[0]
        for i, c_out in enumerate(chans[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c_in if j == 0 else c_out, c_out,
                                                     stride if j == 0 else 1, 'relu', 0.0)
                                          for j in range(blocks)]))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.attention = attention
        if attention:
            self.global_net = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),
                                            nn.AdaptiveMaxPool2d(1), nn.Flatten())
            self.att3 = AttentionPool(chans[2], 64, hidden)
            self.att4 = AttentionPool(chans[3], 64, hidden)
            self.feature_dim = chans[2] + chans[3]
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.feature_dim = chans[3]
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def cam_maps(self, x):
        if self.attention:
            raise ValueError("the attention ResNet's classifier reads attention-pooled features")
        return super().cam_maps(x)

    def features_and_maps(self, x):
        """(features, [attention map at block 3, at block 4]) of an attention model."""
        x = self.stages[1](self.stages[0](x))
        l3 = self.stages[2](x)                      # block 3 (32 filters)
        l4 = self.stages[3](l3)                     # block 4 (64 filters)
        g = self.global_net(l4)                     # conv between two max-pools
        h3, a3 = self.att3(l3, g)
        h4, a4 = self.att4(l4, g)
        return torch.cat([h3, h4], dim=1), [a3, a4]

    def features(self, x):
        if self.attention:
            return self.features_and_maps(x)[0]
        return self.pool(self.feature_maps(x))


class VGG16(StagedNet):
    """VGG-16 with BatchNorm for 32x32 inputs (AGAIN Sec. 3 measures ASC on it): thirteen 3x3
    convs in five blocks (64 x2, 128 x2, 256 x3, 512 x3, 512 x3), each conv + BN + activation,
    2x2 max-pooling after blocks 1-4, then a global average pool over block 5's 2x2 maps and one
    linear layer 512 -> classes. The usual CIFAR VGG-16 max-pools block 5 to 1x1 instead; here
    the classifier reads globally average-pooled maps, as CAM (AGAIN Eq. (1)) requires (and as
    the CAM paper did for VGG), so block 5's maps are what CAM, ASC and an ASE head read.
    ``width`` scales every channel count."""

    BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, num_classes=10, in_channels=3, width=1.0, act='relu', slope=0.01):
        super().__init__()
        stages, c_in = [], in_channels
        for i, block in enumerate(self.BLOCKS):
            layers = []
            for c in block:
                c_out = max(1, int(round(c * width)))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           make_act(act, slope)]
                c_in = c_out
            if i < 4:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.first_stage_number = 1          # stages[0] is block 1
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in


def _att_resnet(**kw):
    kw.setdefault('attention', True)
    return CifarResNet(**kw)


ARCHITECTURES = {
    'cnn_b': CNNB,
    'madry_cnn': MadryCNN,
    'resnet18': ResNet18,
    'wrn': WideResNet,
    'cifar_resnet': CifarResNet,
    'att_resnet': _att_resnet,
    'vgg16': VGG16,
}


def build(name, num_classes, in_channels, **kw):
    """Build a model by name; the instance keeps ``arch_name`` and ``arch_kwargs`` so a
    checkpoint can rebuild it exactly (see common.save_checkpoint / common.model_from_checkpoint)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(ARCHITECTURES)})")
    ase_layer = kw.pop('ase_layer', None)
    model = ARCHITECTURES[name](num_classes=num_classes, in_channels=in_channels, **kw)
    if ase_layer is not None:
        if getattr(model, 'attention', False):
            raise ValueError("the attention ResNet takes no ASE head")
        model.add_ase(ase_layer)
        kw['ase_layer'] = ase_layer
    model.arch_name = name
    model.arch_kwargs = dict(num_classes=num_classes, in_channels=in_channels, **kw)
    return model
