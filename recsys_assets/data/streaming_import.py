"""Mosaic Streaming without its dataset zoo.

Importing any module of `streaming` runs the package's __init__, which imports streaming.text, .vision and
.multimodal (tokenizers, torchvision), and streaming.base.dataloader imports transformers for the batch types of
its StreamingDataLoader, which this project does not use. That is about 3 s per process on 2 cores, paid by every
rank of every training launch and every Spark worker that writes MDS. `import_streaming()` imports the package
with those modules stood in for by empty ones and removes the stand-ins afterwards, so a later
`import streaming.text` or `import transformers` still loads the real modules.
"""

from __future__ import annotations

import sys
import types

# the package's own dataset zoo, imported by streaming/__init__.py and not used here
ZOO = ("streaming.text", "streaming.vision", "streaming.multimodal")
# what streaming.base.dataloader imports from transformers: module -> class
TRANSFORMERS_TYPES = {
    "transformers.feature_extraction_utils": "BatchFeature",
    "transformers.tokenization_utils_base": "BatchEncoding",
}


def import_streaming() -> types.ModuleType:
    """The `streaming` package, imported without its zoo (and without transformers where the process has not
    loaded it). Call before `from streaming... import ...`; a second call returns the loaded package."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    stand_ins = {name: types.ModuleType(name) for name in ZOO}
    if "transformers" not in sys.modules:
        stand_ins["transformers"] = types.ModuleType("transformers")
        for module, cls in TRANSFORMERS_TYPES.items():
            stand_ins[module] = types.ModuleType(module)
            # no object is ever of this class: the dataloader's isinstance checks are False
            setattr(stand_ins[module], cls, type(cls, (dict,), {}))
    sys.modules.update(stand_ins)
    try:
        import streaming
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    for name in ZOO:  # `streaming.text` is then the real module once imported, never a stand-in
        if isinstance(getattr(streaming, name.rsplit(".", 1)[1], None), types.ModuleType):
            delattr(streaming, name.rsplit(".", 1)[1])
    return streaming
