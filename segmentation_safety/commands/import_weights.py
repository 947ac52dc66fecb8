"""`segsafe import-weights`: a public segmentation checkpoint -> a models directory.

Reads an upstream state dict safely (``torch.load(weights_only=True)``), recognises the
architecture from its tensor names, and writes ``<out>/segmenter.safetensors`` with the
metadata the node and ``segsafe evaluate`` use: architecture, class names,
normalisation, network input size, the segmenter's fingerprint and where it came from.

Supported: EdgeNets' ESPNetv2 segmentation checkpoints (Cityscapes: 19 train ids plus
the upstream background channel; Pascal VOC: 21 classes; input size from the file
name's _<W>x<H>, e.g. city_1024x512 -> 512x1024) and torchvision's
``lraspp_mobilenet_v3_large`` and ``deeplabv3_resnet50`` state dicts (21 VOC classes,
or any count; input 520x928, torchvision's short side 520 at 16:9).

Example (the real weights in ../shared/real):
  segsafe import-weights ../shared/real/espnetv2/espnetv2_s_2.0_city_1024x512.pth \\
      --out models/espnetv2_city
  segsafe calibrate --models models/espnetv2_city --dataset cityscapes \\
      --root /data/cityscapes --detectors max_softmax,entropy,max_logit,energy
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segmentation_safety.checkpoint import INPUT_SIDE_RANGE, input_size_problem
from segmentation_safety.errors import InvalidArgumentError, check_writable, report_user_errors
from segmentation_safety.models.importers import SIGNATURES, ImportWeightsError

#: The name calibrate, evaluate --models and the node's models_dir look for.
BUNDLE_NAME = "segmenter.safetensors"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="turn a public segmentation checkpoint (.pth) into a model bundle",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="upstream weights (.pth / .pt state dict)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help=f"models directory to write {BUNDLE_NAME} into",
    )
    p.add_argument(
        "--arch",
        choices=sorted(SIGNATURES),
        default=None,
        help="expected architecture (default: recognised from the tensor names)",
    )
    low, high = INPUT_SIDE_RANGE
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help=f"network input size, each side within {low}..{high}, that calibrate and the "
        "node run the network at (default for ESPNetv2: the _<W>x<H> in the EdgeNets file "
        "name, else 512 1024; for torchvision: 520 928, its short side 520 at 16:9)",
    )
    p.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="text file with one class name per line, in output-channel order; sets the "
        "number of classes (default: Cityscapes train ids for 19 classes and for ESPNetv2's "
        "20 channels, VOC for 21, else numbers)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(run=run)


@report_user_errors("import-weights")
def run(args: argparse.Namespace) -> int:
    from segmentation_safety.checkpoint import save_bundle
    from segmentation_safety.models.importers import import_checkpoint

    out = _bundle_path(args.out)
    check_writable(out)
    if out.exists() and not args.force:
        # Parts trained on the old segmenter would be refused once it is replaced.
        raise InvalidArgumentError(f"{out} exists (pass --force to replace it)")
    if args.input_size is not None:
        problem = input_size_problem(args.input_size)
        if problem is not None:
            h, w = args.input_size
            raise InvalidArgumentError(
                f"--input-size {h} {w}: {problem}, as the node's input_size parameter"
            )
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


def _bundle_path(out: Path) -> Path:
    """Where the bundle goes for ``--out``: a folder, or that folder's segmenter.safetensors.

    Another file name is refused rather than written: calibrate stores its operating
    points in the folder's segmenter.safetensors and the node's models_dir reads that
    name, so a bundle named otherwise could only ever be evaluated, never calibrated or
    run. Refusing before any work costs the user one retyped path; writing it would cost
    them a bundle that the printed next step cannot use.
    """
    if out.suffix != ".safetensors":
        return out / BUNDLE_NAME
    if out.name == BUNDLE_NAME:
        return out
    raise InvalidArgumentError(
        f"--out {out}: give a folder; import-weights writes FOLDER/{BUNDLE_NAME}, the name "
        f"calibrate and the node look for (e.g. --out {out.with_suffix('')})"
    )


def _read_names(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ImportWeightsError(f"--class-names {path}: {e.strerror or e}") from None
    lines = [line.strip() for line in text.splitlines()]
    # Blank lines at the end shift no name; an editor's extra final newline is harmless.
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ImportWeightsError(f"--class-names {path}: no class names in the file")
    # Line n names output channel n-1: a skipped or repeated line would misname classes.
    first_seen: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            raise ImportWeightsError(
                f"--class-names {path}: line {number} is blank (one name per output channel)"
            )
        if name in first_seen:
            raise ImportWeightsError(
                f"--class-names {path}: line {number} repeats {name!r} from line {first_seen[name]}"
            )
        first_seen[name] = number
    return lines
