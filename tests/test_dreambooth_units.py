"""DreamBooth building blocks: example order, the objective, RNG capture, the rare-token rule."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vfx.dreambooth import checkpoint
from vfx.dreambooth.data import ExampleOrder, ImageSet, identifier_problem
from vfx.dreambooth.objective import dreambooth_loss, prediction_target, snr, snr_weights
from vfx.dreambooth.tokens import is_candidate, suggest_tokens


# ---------------------------------------------------------------- example order


def test_example_order_is_a_permutation_per_epoch_and_resumes_exactly():
    order = ExampleOrder(5, seed=3, stream=0)
    first = order.take(5)
    second = order.take(5)
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second  # a new permutation each epoch (fixed by the seed: this holds for seed 3)

    uninterrupted = ExampleOrder(5, seed=3, stream=0)
    expected = uninterrupted.take(13)
    head = ExampleOrder(5, seed=3, stream=0)
    got = head.take(7)
    resumed = ExampleOrder(5, seed=99, stream=7)  # whatever it starts as, the state decides
    resumed.seed, resumed.stream = 3, 0
    resumed.load_state_dict(head.state_dict())
    assert got + resumed.take(6) == expected


def test_image_set_crops_square_and_flips_only_when_asked():
    image = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
    fixed = ImageSet.from_arrays([image], 8)
    assert fixed.fixed and fixed.pixels(0).shape == (3, 8, 8)
    assert torch.equal(fixed.pixels(0), fixed.centre(0))
    moving = ImageSet.from_arrays([image], 8, random_crop=True, flip=True)
    generator = torch.Generator().manual_seed(0)
    crops = {tuple(moving.pixels(0, generator).flatten()[:4].tolist()) for _ in range(20)}
    assert not moving.fixed and len(crops) > 1


# ---------------------------------------------------------------- objective


def test_loss_is_instance_plus_weighted_prior_and_each_term_is_an_mse():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    loss, instance, prior = dreambooth_loss(pred, target, 2, 0.5)
    # Means of 512 float32 squares, perhaps summed in another order than here: pairwise summation
    # rounds about log2(512) = 9 times, so k = 16 eps of the value (measured: under 1).
    def close(a, b):
        return float((a - b).abs()) <= 16 * torch.finfo(torch.float32).eps * float(b.abs())

    assert close(instance, ((pred[:2] - target[:2]) ** 2).mean())
    assert close(prior, ((pred[2:] - target[2:]) ** 2).mean())
    assert close(loss, instance + 0.5 * prior)
    only, only_instance, none = dreambooth_loss(pred[:2], target[:2], 2, 0.5)
    assert none is None and torch.equal(only, only_instance)


def test_prior_weight_zero_leaves_the_gradients_unchanged(tiny_unet):
    """With λ = 0, class examples in the batch change no gradient; with λ = 1 they do."""
    import copy

    # In float64, so that "unchanged" can be checked at the precision's own rounding level.
    unet, scheduler = copy.deepcopy(tiny_unet[0]).double(), tiny_unet[1]
    torch.manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    timesteps, cond = torch.tensor([100, 700]), torch.randn(2, 77, 32, dtype=torch.float64)

    def grads(batch: int, weight: float) -> list[torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        noisy = scheduler.add_noise(latents[:batch], noise[:batch], timesteps[:batch])
        pred = unet(noisy, timesteps[:batch], cond[:batch]).sample
        loss, _, _ = dreambooth_loss(pred, noise[:batch], 1, weight)
        loss.backward()
        return [p.grad.clone() for p in unet.parameters()]

    alone, with_zero, with_one = grads(1, 0.0), grads(2, 0.0), grads(2, 1.0)
    # A batch of 2 runs other kernel blockings than a batch of 1, so sums round differently. Every
    # gradient is a sum of terms no larger than the largest gradient entry, so the rounding is bounded
    # by a few dozen float64 epsilons of that scale (about 5 are measured on the tiny UNet).
    scale = max(float(g.abs().max()) for g in alone)
    rounding = 64 * torch.finfo(torch.float64).eps * scale
    assert max(float((a - b).abs().max()) for a, b in zip(alone, with_zero)) <= rounding
    assert max(float((a - b).abs().max()) for a, b in zip(alone, with_one)) > 1e-3 * scale


def test_v_prediction_target_and_snr_weights():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    eps = torch.finfo(torch.float32).eps
    # Two products and a difference, each rounding once: k = 4 eps of the inputs' scale (measured: exact).
    scale = max(float(x0.abs().max()), float(noise.abs().max()))
    assert float((prediction_target(scheduler, x0, noise, t) - expected).abs().max()) <= 4 * eps * scale
    ratio = snr(scheduler, t)
    assert ratio[0] > 5 > ratio[2]
    # A clamp and a division of the same ratio, weights at most 1: k = 4 eps (measured: exact).
    assert float((snr_weights(scheduler, t, 5.0) - torch.clamp(ratio, max=5.0) / (ratio + 1)).abs().max()) <= 4 * eps
    epsilon = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    weights = snr_weights(epsilon, t, 5.0)
    assert weights[0] < 1 and weights[2] == 1  # noisy timesteps keep weight 1; clean ones are damped
    assert torch.equal(prediction_target(epsilon, x0, noise, t), noise)


# ---------------------------------------------------------------- RNG capture


def test_rng_state_round_trip_restores_every_generator():
    generator = torch.Generator().manual_seed(5)
    tensors, values = checkpoint.rng_state(generator)

    def draw():
        return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=generator)))

    first = draw()
    checkpoint.set_rng_state(tensors, values, generator)
    assert draw() == first


def test_optimizer_state_survives_the_file_format():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.tensor([1.0, -2.0, 3.0])
    optimizer.step()
    tensors, meta = checkpoint.optimizer_to_files(optimizer.state_dict())
    import json

    restored = checkpoint.optimizer_from_files(tensors, json.loads(json.dumps(meta)))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])


# ---------------------------------------------------------------- tokens and prompts


def clip_tokenizer(tmp_path, words):
    """A CLIP BPE tokenizer whose whole-word tokens are `words`, in that id order."""
    import vfx.tokenizer as bpe
    from transformers import CLIPTokenizer

    saved = bpe.WORDS
    bpe.WORDS = tuple(words)
    try:
        bpe.write_tokenizer_files(tmp_path)
    finally:
        bpe.WORDS = saved
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")


def test_rare_token_rule_on_a_vocabulary_with_known_answers(tmp_path):
    words = ["a", "photo", "of", "dog", "sky", "the", "bnq", "sks", "mph", "zwx", "qwrtz", "zw", "xkcd", "dvkt"]
    tokenizer = clip_tokenizer(tmp_path, words)
    found = [c.token for c in suggest_tokens(tokenizer, 10)]
    # Vowel-free, 3-4 letters, not a known abbreviation; later merges (rarer) first.
    assert found == ["dvkt", "xkcd", "zwx", "bnq"]
    for word in found:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    assert not is_candidate("dog") and not is_candidate("sky") and not is_candidate("sks")
    assert not is_candidate("zw") and not is_candidate("qwrtz") and not is_candidate("h4x")


def test_tiny_tokenizer_has_no_rare_token_and_the_command_says_so(tmp_path):
    """The tiny vocabulary holds only the English words it was built from: the rule rejects all of them."""
    from conftest import ok
    from dreambooth_helpers import make_project
    from vfx.models import tiny_model_dir
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model_dir("tiny") / "tokenizer"))
    assert suggest_tokens(tokenizer) == []
    whole_words = [t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and len(t) > 5]
    assert "dog" in whole_words and not any(is_candidate(w) for w in whole_words)
    root = make_project(tmp_path / "p")
    result = ok("tokens", root, "--json")
    import json

    assert json.loads(result.stdout)["tokens"] == []
    assert "no token" in ok("tokens", root).stdout


def test_identifier_checks(tmp_path):
    tokenizer = clip_tokenizer(tmp_path, ["a", "photo", "of", "dog", "zwx"])
    assert identifier_problem(tokenizer, "a photo of zwx dog", "a photo of a dog", None) is None
    assert "no word" in identifier_problem(tokenizer, "a photo of a dog", "a photo of a dog", None)
    assert "does not contain" in identifier_problem(tokenizer, "a photo of dog", None, "zwx")
    assert "splits into" in identifier_problem(tokenizer, "a photo of qqzz dog", None, "qqzz")


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import DDPMScheduler

    from conftest import tiny_pipe

    pipe = tiny_pipe()
    return pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
