"""DeepFloyd IF stage I as a prior: 64x64 pixels, T5 text encoder, learned-variance UNet.

The UNet outputs 6 channels (epsilon, then the variance interpolation); the pixel prior
takes the first 3 as epsilon. The weights are gated on the hub: accept the license on
the model's page and log in (`hf auth login`) before the first download.
"""

from __future__ import annotations

from dream3d.guidance.priors.pixel import PixelPrior


class DeepFloydIFPrior(PixelPrior):
    name = "if"
    default_model = "if-i-xl"  # an alias (hub.py)
    # IFPipeline's prompt length
    text_max_length = 77
    download_note = " after accepting its license on its Hugging Face page and `hf auth login` (it is gated)"
