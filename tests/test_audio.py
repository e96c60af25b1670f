"""The source's audio: kept by extract for the selected range, muxed by decode into every video.mp4;
dropped with a note when --stride or --fps change the timing. And the video as extract's argument."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import EDIT_STEPS, assert_bad, invoke, ok, ok_json, run_edit, status_rows, textured

FPS = 8
FRAMES = 16  # 2 s of video
RATE = 44100
LOW, HIGH = 440.0, 880.0  # the tone: LOW for the first second, HIGH after
SWITCH = 1.0
AUDIO_SECONDS = 2.5  # the audio runs on past the video's end


def tone(times: np.ndarray) -> np.ndarray:
    phase = np.where(times < SWITCH, LOW * times, LOW * SWITCH + HIGH * (times - SWITCH))
    return (0.5 * np.sin(2 * np.pi * phase)).astype(np.float32)


def tone_clip(path: Path) -> Path:
    """An H.264 video stream (a textured pan) and an AAC stereo stream of `tone`."""
    image = textured(96)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=RATE, layout="stereo")
        for index in range(FRAMES):
            frame = np.ascontiguousarray(image[index : index + 64, index : index + 64])
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        samples = tone(np.arange(round(AUDIO_SECONDS * RATE)) / RATE)
        for start in range(0, len(samples), 1024):
            block = samples[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.stack([block, block]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = RATE, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """The first channel of a file's audio, decoded, and its sample rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(stream)])
        return samples, stream.codec_context.sample_rate


def dominant(samples: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the strongest FFT bin."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * rate / len(samples)


def assert_tone(samples: np.ndarray, rate: int, start: float, end: float, frequency: float) -> None:
    got = dominant(samples[round(start * rate) : round(end * rate)], rate)
    assert abs(got - frequency) < 2 * rate / ((end - start) * rate), (start, end, got, frequency)


def assert_duration(samples: np.ndarray, rate: int, seconds: float) -> None:
    """Decoded length: the encoder pads the last AAC frame, so up to 1024 samples more."""
    assert 0 <= len(samples) - seconds * rate <= 1024, (len(samples), seconds * rate)


def video_frames(path: Path) -> tuple[int, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), Fraction(stream.average_rate)


@pytest.fixture
def clip(tmp_path) -> Path:
    return tone_clip(tmp_path / "tone.mp4")


@pytest.fixture
def sound_project(tmp_path) -> Path:
    root = tmp_path / "proj"
    ok("init", root, "--size", "64x64", "--chunk-frames", "4")
    return root


def test_audio_kept_through_decode_and_edit(sound_project, clip):
    root = sound_project
    summary = ok_json("extract", root, clip)  # the video as the argument
    assert summary["frames"] == FRAMES and summary["audio"]["sample_rate"] == RATE
    marker = json.loads(next((root / "frames" / ".done").glob("*.json")).read_text())
    assert "audio.m4a" in [part["path"] for part in marker["parts"]]
    assert "audio.m4a" in json.loads((root / "frames" / "stage.json").read_text())["artifacts"]
    ok("encode", root)
    ok("decode", root)
    ok("invert", root, "--steps", EDIT_STEPS, "--save-steps", EDIT_STEPS, "--no-reconstruction")
    run_edit(root, "--name", "robot")
    ok("decode", root, "--edit", "robot")
    for name in ("source", "robot"):
        video = root / "decoded" / name / "video.mp4"
        assert video_frames(video) == (FRAMES, Fraction(FPS))
        with av.open(str(video)) as container:
            starts = {stream.type: stream.start_time * stream.time_base for stream in container.streams}
            assert starts == {"video": 0, "audio": 0}
        samples, rate = read_audio(video)
        assert_duration(samples, rate, FRAMES / FPS)
        assert_tone(samples, rate, 0.0, SWITCH - 0.05, LOW)  # in sync: the switch stays at 1 s
        assert_tone(samples, rate, SWITCH + 0.05, FRAMES / FPS, HIGH)
    assert json.loads((root / "decoded" / "robot" / "stage.json").read_text())["inputs"]["frames/audio.m4a"]


def test_audio_is_checksummed_with_the_frames(sound_project, clip):
    ok("extract", sound_project, clip)
    assert status_rows(sound_project, "--verify")["frames"]["state"] == "complete"
    audio = sound_project / "frames" / "audio.m4a"
    data = bytearray(audio.read_bytes())
    data[len(data) // 2] ^= 0xFF
    audio.write_bytes(bytes(data))
    assert status_rows(sound_project, "--verify")["frames"]["state"] == "damaged"
    ok("extract", sound_project, clip)  # the rerun repairs it
    assert status_rows(sound_project, "--verify")["frames"]["state"] == "complete"


def test_start_end_trim_the_audio(sound_project, clip):
    summary = ok_json("extract", sound_project, clip, "--start", "0.5s", "--end", "1.5s")
    assert summary["frames"] == FPS  # 0.5 s to 1.5 s: one second of frames
    samples, rate = read_audio(sound_project / "frames" / "audio.m4a")
    assert summary["audio"]["samples"] == RATE
    assert_duration(samples, rate, summary["frames"] / FPS)
    assert_tone(samples, rate, 0.0, 0.45, LOW)  # the switch at 1 s of the source is at 0.5 s here
    assert_tone(samples, rate, 0.55, 1.0, HIGH)


def test_stride_drops_the_audio_with_a_note(sound_project, clip, monkeypatch):
    ok("extract", sound_project, clip)
    assert (sound_project / "frames" / "audio.m4a").is_file()
    monkeypatch.setenv("VFX_QUIET", "")
    result = ok("extract", sound_project, clip, "--stride", "2", "--json")
    assert json.loads(result.stdout)["audio"] is None
    notes = [line for line in result.stderr.splitlines() if line.startswith(("note:", "warning:"))]
    assert len(notes) == 1 and "audio is not kept" in notes[0] and "--stride 2" in notes[0], result.stderr
    assert not (sound_project / "frames" / "audio.m4a").exists()  # the earlier extract's audio is gone
    assert status_rows(sound_project, "--verify")["frames"]["state"] == "complete"


def test_video_argument_or_option(sound_project, clip, tmp_path):
    other = tmp_path / "other.mp4"
    other.write_bytes(clip.read_bytes())
    assert ok_json("extract", sound_project, "--video", clip)["frames"] == FRAMES
    assert ok_json("extract", sound_project, clip, "--video", clip)["up_to_date"] is True  # the same file twice
    assert_bad(invoke("extract", sound_project, clip, "--video", other), "other.mp4", "tone.mp4", "pass one")
    assert_bad(invoke("extract", sound_project), "VIDEO", "--video")
