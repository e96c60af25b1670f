"""vfx: diffusion-based video editing and subject personalization as resumable stages."""

__version__ = "0.1.0"

import os as _os

# Library chatter (progress bars, optional-dependency notices) would drown vfx's own stderr;
# it must be silenced before transformers or diffusers are first imported.
for _key, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
):
    _os.environ.setdefault(_key, _value)
