"""Every upper bound jdsearch puts on a size it is given, in one place (``docs/limits.md``).

A size beyond these is refused in one line before anything is allocated or trained: each is far
above any real use and far below what exhausts a machine's memory. Torch-free.
"""

from __future__ import annotations

__all__ = [
    "MAX_ANCHOR_SIZE",
    "MAX_ANNOTATION_BYTES",
    "MAX_BLOCKS",
    "MAX_CHECKPOINT_BYTES",
    "MAX_IMAGE_SIDE",
    "MAX_INPUT_SIDE",
    "MAX_NUM_CLASSES",
    "MAX_POOL_SIZE",
    "MAX_SIZE_DIVISIBLE",
    "MAX_TEXT_BYTES",
    "MAX_WIDTH",
    "byte_size",
]

#: The longest side (pixels) of an input size ``LONGxSHORT``: a detector's input size, an export's
#: ``input_size``, a study's or training's resolutions, ``--size``/``--sizes`` of the commands. Six
#: times the paper's 1333; at 8192x8192 the stem's output alone (64 float32 channels) takes 4 GiB.
MAX_INPUT_SIDE = 8192
#: The longest side (pixels) of an image file or of a COCO image record (PIL's own
#: decompression-bomb limit on pixels applies too); an image is resized to an input size anyway.
MAX_IMAGE_SIDE = 16384
#: The largest RPN anchor (pixels): sixteen times the paper's largest (512) and no larger than any
#: input side; a larger one matches no object, so it can only be a typo.
MAX_ANCHOR_SIZE = 8192
#: The widest conv (channels) and the deepest stage (blocks) an architecture may have: eight times
#: ResNet's widest (2048) and far beyond any searched depth; more only exhausts memory.
MAX_WIDTH = 16384
MAX_BLOCKS = 256
#: The most classes (the background included) a detector may have: a spec's ``num_classes``, a
#: checkpoint's recorded count, ``flops``/``latency --num-classes``. Far above any detection data
#: set (LVIS: 1203), far below a box predictor that fills memory.
MAX_NUM_CLASSES = 100_000
#: The RoI pooler's output side (cells; the paper's is 7): the box head's first layer has
#: ``channels x side²`` inputs.
MAX_POOL_SIZE = 64
#: The multiple an input's sides are padded to (the paper's is 32): the padding can make an input
#: this much larger on each side.
MAX_SIZE_DIVISIBLE = 512
#: The largest text file read as a spec or a description: YAML specs (detector, study, pool), a
#: detectron2 config and each file of its ``_BASE_`` chain, an export's ``detector.json``, a cache
#: record, a class-names file. A real one is a few kB.
MAX_TEXT_BYTES = 16 << 20
#: The largest COCO annotation file (JSON): four times COCO's train2017 instances (448 MB).
MAX_ANNOTATION_BYTES = 2 << 30
#: The largest checkpoint or export weights file: ten times the biggest preset's (X101, ~0.4 GB).
MAX_CHECKPOINT_BYTES = 4 << 30


def byte_size(n: int) -> str:
    """``n`` bytes for a message: ``16 MiB``, ``2 GiB``, ``512 bytes``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
