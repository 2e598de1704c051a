"""Suite-wide settings: no Hugging Face progress bars on stderr.

transformers 5 draws a "Writing model shards" bar on stderr for every `save_pretrained` the checkpoint builders
call, inside the windows where tests read the CLI's stderr. The CLI itself saves no model weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
try:
    import transformers

    transformers.utils.logging.disable_progress_bar()
except ImportError:  # the torch-free runtime tests run without transformers
    pass
