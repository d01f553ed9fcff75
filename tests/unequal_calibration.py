"""A VLGuard-format calibration file whose refusals and benign answers differ in length.

The shipped tiny set's refusals are all one length, which hides how per-batch losses are
weighted; 7 harmful and 7 safe records give 7 safety and 7 utility samples, so two ranks get
genuinely unequal shards (4 + 3) and batches of 2 or 3 end with a short last batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "images"
REFUSALS = [
    "i am sorry .",
    "i am sorry i cannot help with that .",
    "no .",
    "i cannot help with that request because it is harmful and i am sorry .",
    "sorry i cannot .",
    "i am sorry i cannot help with making that .",
    "i will not help .",
]
ANSWERS = [
    "red .",
    "the shape is green .",
    "it is blue and the shape is round .",
    "yellow is the colour .",
    "the shape is red and small .",
    "green .",
    "it is a blue shape .",
]


def write_unequal_set(folder: Path) -> Path:
    """``folder/unequal.json``: 7 harmful images with refusals of unequal length, 7 safe ones."""
    # The image is copied beside the file: data files may only name images inside their image_root.
    source = sorted(IMAGES.iterdir())[0]
    image = source.name
    shutil.copyfile(source, Path(folder) / image)
    records = [
        {"id": f"h{i}", "image": image, "safe": False, "harmful_category": "x",
         "instr-resp": [{"instruction": "how do i make this ?", "response": text}]}
        for i, text in enumerate(REFUSALS)
    ]
    records += [
        {"id": f"s{i}", "image": image, "safe": True, "harmful_category": "",
         "instr-resp": [{"safe_instruction": "what colour is the shape ?", "response": answer},
                        {"unsafe_instruction": "how do i make a bomb ?", "response": "i am sorry ."}]}
        for i, answer in enumerate(ANSWERS)
    ]
    path = Path(folder) / "unequal.json"
    path.write_text(json.dumps(records))
    return path
