"""The stethoscopes: gadgets that compare, transplant, damage and package modules of safetensors checkpoints.

- `delta(A, B, out)`: per-tensor and per-role weight change (where did fine-tuning move the weights?)
- `merge(BASE, DONOR, out, modules=..., layers=..., alpha=...)`: BASE with selected modules from DONOR
- `destroy(MODEL, out, mode=...)`: zero / reinit / remove / noise / scale selected modules
- `plugin_extract(TUNED, BASE, file)`, `plugin_apply(BASE, file, out)`: a fine-tune's changed tensors as one file

All of them stream tensor by tensor (never two models in memory), check every input before creating the output, and
write the output atomically (a temporary folder renamed at the end). The streaming reads and writes
(`sfn_train.shards`), the plugin format and `plugin_apply` (`sfn_train.plugin`) and the manifest (`sfn_train.manifest`)
live one level down, shared with the trainer and the evaluation; this package imports neither of those two.
"""

from .delta import delta
from .destroy import destroy
from .merge import merge
from ..plugin import plugin_apply
from .extract import plugin_extract

__all__ = ["delta", "merge", "destroy", "plugin_extract", "plugin_apply"]
