"""TokenFlow editing: properties that hold with any weights and fail when the method is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import EDIT_STEPS as STEPS
from conftest import (
    assert_bad, assert_every_frame_edited, assert_killed_edit_resumes, assert_static_edit, edit_step, edited,
    inverted, invoke, ok, run_edit, textured, tiny_pipe,
)
from vfx.diffusion.attention import Branches, KeyframeCache, Neighbours, find_layers, propagate
from vfx.diffusion.tokenflow import draw_keyframes, neighbours_by_distance, neighbours_reference

def test_static_video_edits_to_identical_frames(tmp_path):
    assert_static_edit(inverted(tmp_path, [textured(64, seed=3)] * 6))


@pytest.mark.parametrize("count", [1, 7, 8, 9, 17])
def test_every_frame_count_produces_every_frame(tmp_path, count):
    assert_every_frame_edited(inverted(tmp_path, [np.roll(textured(64, seed=1), 4 * k, axis=1) for k in range(count)]),
                              count)


def test_determinism_and_seeds(tmp_path):
    root = inverted(tmp_path, [np.roll(textured(64, seed=2), 6 * k, axis=0) for k in range(10)])
    run_edit(root, "--name", "a", "--seed", "1")
    run_edit(root, "--name", "b", "--seed", "1")
    run_edit(root, "--name", "c", "--seed", "2")
    assert edited(root, "a").tobytes() == edited(root, "b").tobytes()
    records = {n: json.loads((root / "edits" / n / "stage.json").read_text()) for n in "abc"}
    schedule = records["a"]["summary"]["keyframes"]
    assert len(schedule) == STEPS and all(len(row) == 2 for row in schedule)  # windows of 8: [0, 8) and [8, 10)
    assert schedule == records["b"]["summary"]["keyframes"] != records["c"]["summary"]["keyframes"]
    assert edited(root, "a").tobytes() != edited(root, "c").tobytes()
    # Replaying the recorded schedule reproduces the edit exactly.
    replay = tmp_path / "schedule.json"
    replay.write_text(json.dumps(schedule))
    run_edit(root, "--name", "d", "--seed", "99", "--keyframes", replay)
    assert edited(root, "d").tobytes() == edited(root, "a").tobytes()
    np.save(tmp_path / "schedule.npy", np.asarray(schedule))
    run_edit(root, "--name", "n", "--seed", "98", "--keyframes", tmp_path / "schedule.npy")
    assert edited(root, "n").tobytes() == edited(root, "a").tobytes()


def test_injection_counts(tmp_path):
    root = inverted(tmp_path, [np.roll(textured(64, seed=4), 4 * k, axis=1) for k in range(5)])
    none = run_edit(root, "--name", "none", "--pnp-attn-t", "0", "--pnp-f-t", "0")
    assert none["injections"] == {"attention": 0, "conv": 0}
    full = run_edit(root, "--name", "full", "--pnp-attn-t", "1", "--pnp-f-t", "1", "--frame-batch", "3")
    layers = find_layers(tiny_pipe().unet)
    # q/k injection happens in the keyframes' decoder self-attentions, once per layer per step.
    assert full["injections"]["attention"] == STEPS * len(layers.injected_attention)
    # conv injection in every UNet call. One keyframe in 5 frames (window 8): its call takes the first 2
    # frames to propagate (3 frames a call), a second call the last 2.
    keyframes = json.loads((root / "edits" / "full" / "stage.json").read_text())["summary"]["keyframes"]
    assert all(len(row) == 1 for row in keyframes)
    assert full["injections"]["conv"] == 2 * STEPS
    half = run_edit(root, "--name", "half", "--pnp-attn-t", "0.34", "--pnp-f-t", "0.67", "--frame-batch", "3")
    assert half["injections"]["attention"] == 1 * len(layers.injected_attention)
    assert half["injections"]["conv"] == 2 * 2
    assert edited(root, "none").tobytes() != edited(root, "full").tobytes()


def test_reference_layers_of_an_sd_shaped_unet():
    for variant in ("tiny", "tiny-v"):
        unet = tiny_pipe(variant).unet
        layers = find_layers(unet)
        assert layers.injected_conv == "up_blocks.1.resnets.1.conv2"
        expected = [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor"
                    for i, js in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for j in js]
        assert layers.injected_attention == expected
        assert len(layers.self_attention) == 2 * 3 + 1 + 3 * 3  # down, mid, up transformers


def test_v_prediction_model_edits(tmp_path):
    root = inverted(tmp_path, [np.roll(textured(64, seed=5), 4 * k, axis=1) for k in range(4)], model="tiny-v")
    run_edit(root, "--name", "v")
    out = edited(root, "v")
    assert np.isfinite(out).all() and out.std() > 0
    assert json.loads((root / "inversion" / "stage.json").read_text())["params"]["model"].startswith("tiny-v")


def test_reference_propagation_differs_and_weights_match_the_reference():
    plan = neighbours_reference(list(range(16)), 8)
    assert plan.slot_a[:8].tolist() == [0] * 8 and plan.weight_a[:8].tolist() == [1.0] * 8
    assert plan.slot_a[8:].tolist() == [1] * 8 and plan.slot_b[8:].tolist() == [0] * 8
    assert all(0.5 <= w <= 0.7311 for w in plan.weight_a[8:].tolist())
    near = neighbours_by_distance([2, 3, 6, 9, 0], [2, 6])
    assert near.slot_a.tolist() == [0, 0, 1, 1, 0] and near.slot_b.tolist() == [0, 1, 1, 1, 0]
    assert near.weight_a.tolist() == [1.0, 0.75, 1.0, 1.0, 1.0]


def test_reference_mode_runs_and_differs(tmp_path):
    root = inverted(tmp_path, [np.roll(textured(64, seed=6), 4 * k, axis=1) for k in range(10)])
    run_edit(root, "--name", "ours", "--batch-size", "4")
    result = run_edit(root, "--name", "ref", "--batch-size", "4", "--propagation", "reference")
    assert result["unet_frame_evaluations"] == STEPS * 3 * (3 + 10)  # keyframes evaluated twice
    assert edited(root, "ours").tobytes() != edited(root, "ref").tobytes()


def test_correspondences_recover_a_known_translation():
    """Frame k is the texture shifted right by k tokens (8 px): interior tokens must match (r, c - k)."""
    pipe = tiny_pipe()
    base = textured(160, seed=7)
    frames = np.stack([base[16:144, 16 - 8 * k : 144 - 8 * k] for k in range(3)])
    trace = {}
    edit_step(pipe, frames, [0], trace)
    matched = trace["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"][0]  # [2, 256]
    for row, shift in zip(matched, (1, 2)):
        grid = row.view(16, 16)
        rows, cols = np.divmod(grid.numpy(), 16)
        interior = (slice(2, 14), slice(2 + shift, 14))
        dr = rows[interior] - np.arange(2, 14)[:, None]
        dc = cols[interior] - np.arange(2 + shift, 14)[None, :]
        exact = np.mean((dr == 0) & (dc == -shift))
        # With random weights the field is noisy at a few tokens; its dominant displacement must be the shift.
        assert exact >= 0.85, f"only {exact:.0%} of interior tokens recover a shift of {shift}"
        values, counts = np.unique(dc, return_counts=True)
        assert values[counts.argmax()] == -shift


def test_one_keyframe_feeds_every_frame(monkeypatch):
    """--batch-size >= frames: one keyframe; every propagated self-attention output is made of its outputs."""
    import vfx.diffusion.attention as attention

    pipe = tiny_pipe()
    frames = np.stack([np.roll(textured(64, seed=8), 4 * k, axis=1) for k in range(5)])
    seen = []

    def checked(cache, name, hidden, branches, plan, trace=None):
        assert plan.slot_a.tolist() == plan.slot_b.tolist() == [0] * len(plan.slot_a)
        assert plan.weight_a.tolist() == [1.0] * len(plan.slot_a)
        out = propagate(cache, name, hidden, branches, plan, trace)
        m = branches.n
        keyframe_rows = cache.outputs[name][:, 0]  # [3, L, C]
        for branch in range(3):
            # A blend with weights 1 and 0 gives the keyframe's entries after at most one rounding (half an
            # ulp) each, so a token's distance to its keyframe token is at most 1/2 eps * |largest entry| *
            # sqrt(channels) (measured: exactly 0).
            rows = keyframe_rows[branch]
            bound = 0.5 * torch.finfo(rows.dtype).eps * float(rows.abs().max()) * rows.shape[-1] ** 0.5
            for row in out.view(3, m, *out.shape[1:])[branch]:
                distances = torch.cdist(row, rows, compute_mode="donot_use_mm_for_euclid_dist")
                assert distances.min(dim=1).values.max() <= bound
        seen.append(name)
        return out

    monkeypatch.setattr(attention, "propagate", checked)
    keyframes = draw_keyframes(5, 8, seed=0, step=0)
    assert len(keyframes) == 1
    edit_step(pipe, frames, keyframes)
    assert len(set(seen)) == 16


def test_propagate_blends_two_keyframes():
    cache = KeyframeCache()
    tokens = torch.eye(4).unsqueeze(0).repeat(2, 1, 1)  # 2 keyframes, 4 tokens, 4 channels
    cache.source_tokens["x"] = tokens
    cache.outputs["x"] = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 3.0)], dim=1).transpose(0, 1)
    cache.outputs["x"] = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(3, 2, 4, 4).clone()
    plan = Neighbours(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.25], dtype=torch.float64))
    out = propagate(cache, "x", torch.eye(4).unsqueeze(0).repeat(3, 1, 1), Branches(1), plan)
    # 0.25 * 1 + 0.75 * 3: two products and a sum of values up to 3, k = 4 eps of that scale (measured: exact).
    assert float((out - (0.25 * 1 + 0.75 * 3)).abs().max()) <= 4 * torch.finfo(out.dtype).eps * 3


def test_editor_owns_its_processors_and_refuses_a_foreign_layout():
    """The editor's processors go on at its first call and come off when its session ends; a call that
    is not the editor's meanwhile, or a batch that is not the layout described for the call under way,
    is refused, never reinterpreted; injections are counted."""
    from vfx.diffusion.attention import Call, FrameAttnProcessor, ProcessorContext, conv_hook
    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import Conditioning
    from vfx.diffusion.tokenflow import Embeddings, TokenFlowEditor

    pipe = tiny_pipe()
    unet, before = pipe.unet, dict(pipe.unet.attn_processors)
    emb = Conditioning(torch.zeros(1, 77, unet.config.cross_attention_dim))
    editor = TokenFlowEditor(unet, Schedule.from_pipeline(pipe), Embeddings(emb, emb, emb), 7.5, "distance", 8,
                             torch.device("cpu"))
    x, context = torch.randn(5, 4, 8, 8), emb.hidden.expand(5, -1, -1)
    with torch.no_grad():
        bare = unet(x, 501, encoder_hidden_states=context).sample
        with editor.hooked():
            assert torch.equal(unet(x, 501, encoder_hidden_states=context).sample, bare)  # not the editor's call
            editor.plain_call(x[:2], x[2:4], 501, inject_attention=True, inject_conv=True)
            assert isinstance(unet.attn_processors[find_layers(unet).self_attention[0]], FrameAttnProcessor)
            with pytest.raises(RuntimeError, match="outside a UNet call of its editor"):
                unet(x, 501, encoder_hidden_states=context)
    assert dict(unet.attn_processors) == before
    assert editor.injections == {"attention": len(editor.layers.injected_attention), "conv": 1}
    assert editor.unet_frames == 6
    attn = unet.get_submodule(find_layers(unet).self_attention[0].removesuffix(".processor"))
    tokens = torch.randn(5, 16, attn.to_q.in_features)  # 5 rows: no 3-branch layout
    with pytest.raises(RuntimeError):
        FrameAttnProcessor(ProcessorContext(), True)(attn, tokens)  # no call under way
    with pytest.raises(ValueError, match="3 branches x 2 frames"):
        FrameAttnProcessor(ProcessorContext(Call(Branches(2))), True)(attn, tokens)
    with pytest.raises(ValueError):
        conv_hook(ProcessorContext(Call(Branches(2), inject_conv=True)))(None, (), torch.randn(5, 4, 8, 8))


@pytest.mark.slow
def test_killed_edit_resumes_to_identical_bytes(tmp_path):
    frames = [np.roll(textured(64, seed=9), 4 * k, axis=1) for k in range(8)]
    assert_killed_edit_resumes(inverted(tmp_path, frames, steps=10))


def test_bad_edit_inputs(tmp_path, encoded):
    assert_bad(invoke("edit", encoded, "--prompt", "x"), "vfx invert")
    ok("invert", encoded, "--steps", "4", "--save-steps", "2", "--no-reconstruction")
    assert_bad(invoke("edit", encoded, "--prompt", "x", "--steps", "3"), "--save-steps 3")
    for name in ("../evil", "a/b", ".hidden", "source"):
        assert_bad(invoke("edit", encoded, "--prompt", "x", "--steps", "2", "--name", name), repr(name))
    assert not (encoded.parent / "evil").exists()
    assert_bad(invoke("edit", encoded, "--prompt", "  ", "--steps", "2"), "empty")
    bad = tmp_path / "k.json"
    bad.write_text("[[0, 20]]")
    assert_bad(invoke("edit", encoded, "--prompt", "x", "--steps", "2", "--keyframes", bad), "shape")
    assert not (encoded / "edits").exists()  # a refused edit writes nothing, not even its folder


def test_a_step_moves_its_latents_in_whole_spans_and_the_bytes_do_not_depend_on_it(monkeypatch):
    """With room for every chunk, a step reads the latents and source once and writes once; with room
    for one chunk, once per chunk; both write the same bytes."""
    import vfx.diffusion.tokenflow as tokenflow
    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.diffusion.tokenflow import Embeddings, StepIO, TokenFlowEditor
    from vfx.stages.encode import encode_frames

    pipe = tiny_pipe()
    frames = np.stack([np.roll(textured(64, seed=5), 3 * k, axis=1) for k in range(8)])
    latents = encode_frames(pipe.vae, frames, torch.device("cpu"), 8)
    emb = encode_prompt(pipe, "")

    def step(io_bytes: int):
        monkeypatch.setattr(tokenflow, "IO_BYTES", io_bytes)
        calls = {"read": 0, "read_source": 0, "write": 0}
        out = np.zeros_like(latents)

        def counted(name, fn):
            def wrapped(*args):
                calls[name] += 1
                return fn(*args)
            return wrapped

        io = StepIO(counted("read", lambda s, e: latents[s:e]), lambda idx: latents[idx],
                    counted("read_source", lambda s, e: latents[s:e]), lambda idx: latents[idx],
                    counted("write", lambda s, e, a: out.__setitem__(slice(s, e), a)))
        editor = TokenFlowEditor(pipe.unet, Schedule.from_pipeline(pipe), Embeddings(emb, emb, emb), 7.5,
                                 "distance", 3, torch.device("cpu"), frame_batch=2)
        editor.step(io, len(frames), 2, [1, 4, 6], 501, 401)  # 4 chunks of 2 frames, each with a frame to propagate
        return out, calls

    whole, whole_calls = step(1 << 30)
    single, single_calls = step(1)
    assert whole_calls == {"read": 1, "read_source": 1, "write": 1}
    assert single_calls == {"read": 4, "read_source": 4, "write": 4}
    assert np.array_equal(whole, single) and np.abs(whole).max() > 0


def test_frames_that_share_the_keyframes_call_get_what_their_own_calls_give_them():
    """With room in the keyframes' UNet call, the first frames to propagate join it (one call fewer per
    step); their outputs, and so the step's latents, are those of separate calls up to round-off."""
    from vfx.diffusion.ddim import Schedule
    from vfx.diffusion.text import encode_prompt
    from vfx.diffusion.tokenflow import Embeddings, StepIO, TokenFlowEditor
    from vfx.stages.encode import encode_frames

    pipe = tiny_pipe()
    frames = np.stack([np.roll(textured(64, seed=6), 3 * k, axis=1) for k in range(8)])
    latents = encode_frames(pipe.vae, frames, torch.device("cpu"), 8)
    emb = Embeddings(encode_prompt(pipe, ""), encode_prompt(pipe, ""), encode_prompt(pipe, "a red robot"))

    def step(frame_batch: int):
        out, calls = np.zeros_like(latents), []
        io = StepIO(lambda s, e: latents[s:e], lambda idx: latents[idx], lambda s, e: latents[s:e],
                    lambda idx: latents[idx], lambda s, e, a: out.__setitem__(slice(s, e), a))
        editor = TokenFlowEditor(pipe.unet, Schedule.from_pipeline(pipe), emb, 7.5, "distance", 3,
                                 torch.device("cpu"), frame_batch=frame_batch)
        hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0] // 3))
        try:
            editor.step(io, len(frames), 4, [1, 4, 6], 501, 401, inject_attention=True, inject_conv=True)
        finally:
            hook.remove()
        return out, calls

    joined, joined_calls = step(5)
    separate, separate_calls = step(1)
    assert joined_calls == [5, 3]  # keyframes 1, 4, 6 with frames 0 and 2; then 3, 5 and 7
    assert separate_calls == [3, 1, 1, 1, 1, 1]
    # A call's rows may group the UNet's sums differently by the call's size: float32 round-off, amplified
    # through its layers, of latents of this scale (measured: none, with MKL in strict mode as the tests run it).
    scale = float(np.abs(separate).max())
    assert scale > 0 and np.abs(joined - separate).max() <= 1e-5 * scale
