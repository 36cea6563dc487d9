"""tonetune's pipeline stages (one module per DVC stage) and their shared helpers."""

import logging
import warnings

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that it cannot fetch an optional
# 4-bit kernel from the Hugging Face Hub (`kernels` package). tonetune uses int8, never 4-bit,
# and runs offline, so the line is noise in every stage's output; other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# PEFT and TRL still read transformers' deprecated `is_gradient_checkpointing` each time a model
# is wrapped; the FutureWarning is theirs to fix, not something a tonetune user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
