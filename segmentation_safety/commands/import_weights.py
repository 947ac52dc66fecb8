"""`segsafe import-weights`: a public segmentation checkpoint -> a models directory.

Reads an upstream state dict safely (``torch.load(weights_only=True)``), recognises the
architecture from its tensor names, and writes ``<out>/segmenter.safetensors`` with the
metadata the node and ``segsafe evaluate`` use: architecture, class names,
normalisation, network input size, the segmenter's fingerprint and where it came from.

Supported: the ESPNetv2 Cityscapes checkpoints (input 512×1024, 19 train ids plus the
upstream background channel) and torchvision's ``lraspp_mobilenet_v3_large`` and
``deeplabv3_resnet50`` state dicts (21 VOC classes, or any count).

Example (the real weights in ../shared/real):
  segsafe import-weights ../shared/real/espnetv2/espnetv2_s_2.0_city_1024x512.pth \\
      --out models/espnetv2_city
  segsafe calibrate --models models/espnetv2_city --dataset cityscapes \\
      --root /data/cityscapes --detectors max_softmax,entropy,max_logit,energy
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segmentation_safety.errors import InvalidArgumentError, check_writable, report_user_errors
from segmentation_safety.models.importers import SIGNATURES, ImportWeightsError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="turn a public segmentation checkpoint (.pth) into a model bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="upstream weights (.pth / .pt state dict)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="models directory to write segmenter.safetensors into (or a .safetensors path)",
    )
    p.add_argument(
        "--arch",
        choices=sorted(SIGNATURES),
        default=None,
        help="expected architecture (default: recognised from the tensor names)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="network input size the checkpoint was trained at (default: the publisher's; "
        "512 1024 for the ESPNetv2 Cityscapes weights, the image size for torchvision)",
    )
    p.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="text file with one class name per line (default: Cityscapes train ids for 19 "
        "classes, VOC for 21, else numbers)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(run=run)


@report_user_errors("import-weights")
def run(args: argparse.Namespace) -> int:
    from segmentation_safety.checkpoint import save_bundle
    from segmentation_safety.models.importers import import_checkpoint

    out = args.out if args.out.suffix == ".safetensors" else args.out / "segmenter.safetensors"
    check_writable(out)
    if out.exists() and not args.force:
        # Parts trained on the old segmenter would be refused once it is replaced.
        raise InvalidArgumentError(f"{out} exists (pass --force to replace it)")
    if args.input_size is not None and min(args.input_size) < 8:
        raise InvalidArgumentError("--input-size H W must both be at least 8")
    names = _read_names(args.class_names) if args.class_names else None
    imported = import_checkpoint(args.checkpoint, args.arch, args.input_size, names)
    model = imported.model
    metadata = imported.metadata()
    save_bundle(out, model.state_dict(), metadata)
    size = "x".join(map(str, imported.input_size)) if imported.input_size else "image size"
    print(f"wrote {out}")
    print(f"  {imported.description}")
    print(f"  {model.num_classes} classes, input {size} (H x W), fingerprint "
          f"{metadata['fingerprint']}")  # fmt: skip
    notes = list(imported.notes)
    if imported.input_size and imported.input_size[0] > imported.input_size[1]:
        # Road cameras are wider than tall: most likely W H given for H W.
        h, w = imported.input_size
        notes.append(f"input {h}x{w} is taller than wide; --input-size takes H W ({w} {h}?)")
    for note in notes:
        print(f"  note: {note}")
    print(
        "  next: segsafe calibrate --models "
        f"{out.parent} ... to give each detector an operating point on inlier images"
    )
    return 0


def _read_names(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ImportWeightsError(f"--class-names {path}: {e.strerror or e}") from None
    lines = [line.strip() for line in text.splitlines()]
    names = [line for line in lines if line]
    if not names:
        raise ImportWeightsError(f"{path}: no class names in the file")
    return names
