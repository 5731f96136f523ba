"""Parameters and FLOPs of BiSeNetV1 (README: Model).

python tools/model_info.py --depth 18 --size 1024x2048
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from bisenet import RESNET_LAYOUTS, BiSeNetV1, ModelConfig


def count_parameters(model, with_aux=True):
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if with_aux or not name.startswith("aux_head")
    )


def count_flops(model, size):
    """FLOPs as torch.utils.flop_counter counts them (a multiply-add is 2), convolutions
    dominate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops()


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--depth", type=int, default=18, choices=sorted(RESNET_LAYOUTS))
    parser.add_argument("--num-classes", type=cli.integer(2), default=19)
    parser.add_argument("--size", type=cli.size, default="1024x2048", help="HxW")
    args = parser.parse_args(argv)
    model = BiSeNetV1(ModelConfig(args.depth, args.num_classes)).eval()
    inference, total = count_parameters(model, with_aux=False), count_parameters(model)
    gflops = count_flops(model, args.size) / 1e9
    print(
        f"BiSeNetV1 R{args.depth}: {inference:,} parameters for inference, {total:,} with aux "
        f"heads; {gflops:.1f} GFLOPs at 1x3x{args.size[0]}x{args.size[1]}"
    )


if __name__ == "__main__":
    main()
