"""Mosaic Streaming is imported without its dataset zoo and without transformers (about 3 s in every training rank
and every Spark worker that writes MDS), and the real modules still load afterwards in the same process."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import numpy as np
from recsys_assets.data.blocks import BlockLayout, read_layout, write_blocks

blocks = write_blocks(sys.argv[1], {"x": np.arange(10, dtype=np.int32)}, BlockLayout.of({"x": ("int32", 0)}))
from streaming import MDSWriter, StreamingDataset
loaded = {name: name in sys.modules for name in ("transformers", "torchvision", "streaming.text", "streaming.vision")}
import streaming.text
import transformers
print(json.dumps({
    "blocks": blocks,
    "index": json.load(open(sys.argv[1] + "/index.json"))["shards"][0]["samples"],
    "loaded_with_the_writer": loaded,
    "real_text_module_afterwards": hasattr(streaming.text, "StreamingC4"),
    "real_transformers_afterwards": hasattr(transformers, "__version__"),
    "dataset_class": StreamingDataset.__module__,
}))
"""


def test_the_mds_writer_loads_without_the_zoo_and_the_zoo_still_loads_after(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "mds")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["blocks"] == seen["index"] >= 1  # the writer worked
    assert seen["loaded_with_the_writer"] == {
        "transformers": False,
        "torchvision": False,
        "streaming.text": False,
        "streaming.vision": False,
    }
    assert seen["real_text_module_afterwards"] and seen["real_transformers_afterwards"]
    assert seen["dataset_class"] == "streaming.base.dataset"
