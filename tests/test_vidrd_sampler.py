"""VidRD's iterative sampler (FNR + PNS + DSG) against the official run recorded in `$FIXTURES_DIR/vidrd`: with the
README's stub denoiser and the saved noise it must retrace the official latents step by step, copy exactly the
frames the official code copies (`sampler_dsg_table.json`, every configuration), and return exactly F frames."""
from __future__ import annotations

import pytest
import torch

from modules.samplers.vidrd_iterative import (
    IterativeSettings,
    dsg_steps,
    iterate_clips,
    official_clip_noise,
    sample_long_video,
)
from tests.lavie_fixtures import fixture_tensors
from tests.vidrd_fixtures import DISCRIMINATION, vidrd_fixture_dir
from tests.vidrd_sampler_fixtures import (
    SAMPLER,
    SD21_SCHEDULE,
    SD_SCALING_FACTOR,
    START_FRAMES,
    RecordingDDIM,
    dsg_table,
    fixture_seed,
    sd21_ddim,
    stub_denoiser,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trajectory(fixtures_dir):
    path = vidrd_fixture_dir(fixtures_dir, ("sampler_trajectory.safetensors",), "VidRD sampler trajectory")
    return fixture_tensors(path / "sampler_trajectory.safetensors")


def clip_noises(trajectory) -> list[torch.Tensor]:
    num_clips = trajectory["unet_in"].shape[0]
    return [trajectory["init_noise"]] + [trajectory[f"more_noise_clip{c}"] for c in range(1, num_clips)]


def run_official_config(trajectory, **changes):
    """The sampler on the fixture's configuration (the official defaults, with the fixture's steps, frames and clip
    count) and noise; returns (denoiser inputs, latents after each step, final latents), per clip and step."""
    num_clips, num_steps, batch = trajectory["unet_in"].shape[:3]
    frames = trajectory["init_noise"].shape[2]
    settings = IterativeSettings(clip_frames=frames, num_inference_steps=num_steps, **changes)
    calls: list[torch.Tensor] = []
    scheduler = RecordingDDIM(**SD21_SCHEDULE)
    noises = clip_noises(trajectory)
    _, channels, _, height, width = trajectory["init_noise"].shape
    latents = sample_long_video(
        stub_denoiser(calls), scheduler, trajectory["prompt_embeds"], trajectory["negative_prompt_embeds"],
        num_frames=num_clips * frames, latent_shape=(channels, height, width), settings=settings,
        clip_noise=lambda c: noises[c],
    )
    unet_in = torch.stack([x[:batch] for x in calls]).unflatten(0, (num_clips, num_steps))
    after = torch.stack(scheduler.after_step).unflatten(0, (num_clips, num_steps))
    return unet_in, after, latents


def test_timesteps_are_the_official_ones(trajectory):
    scheduler = sd21_ddim()
    scheduler.set_timesteps(len(trajectory["timesteps"]))
    assert torch.equal(scheduler.timesteps, trajectory["timesteps"])


def test_trajectory_matches_the_official_sampler(trajectory):
    unet_in, after, latents = run_official_config(trajectory)
    torch.testing.assert_close(unet_in, trajectory["unet_in"], **SAMPLER)
    torch.testing.assert_close(after, trajectory["latents_after_step"], **SAMPLER)
    # the stub decoder (the first 3 latent channels), as the official pipeline turns latents into a video
    video = ((latents / SD_SCALING_FACTOR)[:, :3] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(video, trajectory["video"], **SAMPLER)


def test_clip_starts_reverse_the_previous_noise(trajectory):
    """FNR: a later clip's prompt frames start as the previous clip's z_T reversed, bit for bit; PNS frames are
    alpha/sqrt(1+alpha^2) of it plus the clip's noise, as in the official run."""
    unet_in, _, _ = run_official_config(trajectory)
    prompt = IterativeSettings().prompt_frames
    for clip in range(1, unet_in.shape[0]):
        reversed_start = unet_in[clip - 1, 0].flip(2)
        assert torch.equal(unet_in[clip, 0][:, :, :prompt], reversed_start[:, :, :prompt])
        torch.testing.assert_close(unet_in[clip, 0], trajectory["unet_in"][clip, 0], **START_FRAMES)


def test_negative_control_without_staged_guidance_misses(trajectory):
    """beta = 0 (no DSG) must miss the official inputs clearly, so the comparison above can fail."""
    unet_in, _, _ = run_official_config(trajectory, beta=0.0)
    assert (unet_in - trajectory["unet_in"]).abs().max() > DISCRIMINATION * SAMPLER["atol"]


def test_official_noise_draws(fixtures_dir, trajectory):
    """With the fixture's seed, the official RNG order (clip 0 frame by frame, later clips one PNS tensor) draws
    exactly the saved noise."""
    seed = fixture_seed(fixtures_dir / "vidrd" / "README.md")
    batch, channels, frames, height, width = trajectory["init_noise"].shape
    noise = official_clip_noise((batch, channels, frames, height, width), IterativeSettings().alpha,
                                torch.Generator().manual_seed(seed))
    for clip, expected in enumerate(clip_noises(trajectory)):
        assert torch.equal(noise(clip), expected), f"clip {clip}"


def leading_copies(first: list[torch.Tensor], second: list[torch.Tensor], frame: int) -> int:
    """Leading steps at which `frame` of the second clip's input equals frame N-1-frame of the first clip's input."""
    count = 0
    for a, b in zip(first, second):
        if not torch.equal(b[:, :, frame], a[:, :, a.shape[2] - 1 - frame]):
            break
        count += 1
    return count


def test_dsg_table(fixtures_dir, trajectory):
    """Every configuration of the official table: the steps at which each frame of clip 1 entered the denoiser as a
    copy of clip 0's reversed frame, observed on our sampler, and K_j from the formula. M = N is refused."""
    path = vidrd_fixture_dir(fixtures_dir, ("sampler_dsg_table.json",), "VidRD DSG table")
    cond, uncond = trajectory["prompt_embeds"], trajectory["negative_prompt_embeds"]
    _, channels, _, height, width = trajectory["init_noise"].shape
    rows = dsg_table(path / "sampler_dsg_table.json")
    sampled = 0
    for row in rows:
        frames, prompt, steps, beta = row["N"], row["M"], row["S"], row["beta"]
        where = f"S={steps} N={frames} M={prompt} beta={beta}"
        formula = dsg_steps(steps, prompt, beta) + [0] * (frames - prompt)
        assert formula == row["dsg_steps_per_frame"], where
        if prompt >= frames:
            with pytest.raises(ValueError, match="prompt_frames"):
                IterativeSettings(clip_frames=frames, prompt_frames=prompt, beta=beta, num_inference_steps=steps)
            continue
        settings = IterativeSettings(clip_frames=frames, prompt_frames=prompt, beta=beta, num_inference_steps=steps)
        calls: list[torch.Tensor] = []
        noise = official_clip_noise((1, channels, frames, height, width), settings.alpha,
                                    torch.Generator().manual_seed(0))
        list(iterate_clips(stub_denoiser(calls), sd21_ddim(), cond, uncond, noise, 2, settings))
        inputs = [x[:1] for x in calls]
        first, second = inputs[:steps], inputs[steps:]
        observed = [leading_copies(first, second, j) for j in range(frames)]
        assert observed == row["equal_steps_per_frame"], where
        sampled += 1
    assert sampled, "no configuration with M < N in the DSG table"


def test_official_schedule_of_staged_guidance():
    """The paper-size defaults: 50 steps, M=4, beta=0.4 guide the prompt frames for 20, 15, 10 and 5 steps."""
    defaults = IterativeSettings()
    assert dsg_steps(defaults.num_inference_steps, defaults.prompt_frames, defaults.beta) == [20, 15, 10, 5]
    assert (defaults.clip_frames, defaults.prompt_frames, defaults.alpha, defaults.beta, defaults.guidance_scale,
            defaults.negative_prompt) == (8, 4, 4.0, 0.4, 10.0, "watermark")


@pytest.mark.parametrize("settings, message", [
    (dict(prompt_frames=8, clip_frames=8), "prompt_frames"),
    (dict(prompt_frames=9, clip_frames=8), "prompt_frames"),
    (dict(prompt_frames=-1), "prompt_frames"),
    (dict(alpha=-0.5), "alpha"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=1.5), "beta"),
    (dict(clip_frames=0), "clip_frames"),
    (dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        IterativeSettings(**settings)


@pytest.mark.parametrize("num_frames", [0, -3])
def test_bad_frame_count_is_named(num_frames):
    with pytest.raises(ValueError, match="num_frames"):
        sample_long_video(stub_denoiser(), sd21_ddim(), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), num_frames,
                          (4, 2, 2), IterativeSettings(num_inference_steps=2))


SMALL = dict(num_inference_steps=3)


def small_video(num_frames: int, settings: IterativeSettings, seeds: list[int], progress=None) -> torch.Tensor:
    cond = torch.stack([torch.full((2, 4), 0.1 * s) for s in seeds])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return sample_long_video(stub_denoiser(), sd21_ddim(), cond, torch.zeros_like(cond), num_frames, (4, 2, 2),
                             settings, generator=generators, progress=progress)


@pytest.mark.parametrize("keep_prompt_frames", [True, False])
def test_exactly_the_frames_asked_for(keep_prompt_frames):
    """F frames out for any F, each shorter video the start of a longer one (same seed); the clip count follows
    the documented counting and the progress hook counts every clip's steps."""
    settings = IterativeSettings(keep_prompt_frames=keep_prompt_frames, **SMALL)
    calls = []
    longest = small_video(24, settings, [3], progress=lambda done, total: calls.append((done, total)))
    clips = settings.clips_for(24)
    assert clips == (3 if keep_prompt_frames else 5)
    total = clips * settings.num_inference_steps
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert longest.shape == (1, 4, 24, 2, 2)
    for num_frames in (1, 5, 8, 9, 13, 17):
        video = small_video(num_frames, settings, [3])
        assert video.shape == (1, 4, num_frames, 2, 2)
        torch.testing.assert_close(video, longest[:, :, :num_frames], atol=0, rtol=0)


def test_prompt_frames_dropped_when_asked():
    """keep_prompt_frames=False: clip 1's first new frame is the frame after its M prompt frames."""
    kept = small_video(16, IterativeSettings(**SMALL), [5])
    dropped = small_video(12, IterativeSettings(keep_prompt_frames=False, **SMALL), [5])
    prompt = IterativeSettings().prompt_frames
    torch.testing.assert_close(dropped[:, :, 8:], kept[:, :, 8 + prompt:], atol=0, rtol=0)
    # decoded clips (B, N, C, H, W): the first keeps all its frames, a later one loses its prompt frames
    settings = IterativeSettings(keep_prompt_frames=False)
    frames = torch.arange(settings.clip_frames).view(1, -1, 1, 1, 1)
    assert torch.equal(settings.kept_frames(frames, 0, dim=1), frames)
    assert torch.equal(settings.kept_frames(frames, 1, dim=1).flatten(), torch.arange(prompt, settings.clip_frames))


def test_a_video_does_not_depend_on_its_batch():
    """One generator per video: a video sampled in a batch equals the same seed sampled alone."""
    settings = IterativeSettings(**SMALL)
    together = small_video(20, settings, [1, 2])
    alone = small_video(20, settings, [2])
    torch.testing.assert_close(together[1:], alone, atol=0, rtol=0)


def test_clips_are_made_one_at_a_time():
    """`iterate_clips` is lazy: taking one clip runs one clip's steps, so a caller can decode and drop it before the
    next is made (the memory of one clip)."""
    settings = IterativeSettings(**SMALL)
    calls: list[torch.Tensor] = []
    noise = official_clip_noise((1, 4, settings.clip_frames, 2, 2), settings.alpha, torch.Generator().manual_seed(0))
    clips = iterate_clips(stub_denoiser(calls), sd21_ddim(), torch.ones(1, 2, 4), torch.zeros(1, 2, 4), noise, 5,
                          settings)
    first = next(clips)
    assert first.shape == (1, 4, settings.clip_frames, 2, 2)
    assert len(calls) == settings.num_inference_steps
    next(clips)
    assert len(calls) == 2 * settings.num_inference_steps
